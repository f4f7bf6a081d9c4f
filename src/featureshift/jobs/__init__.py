"""Engine layer: how render work is planned, run and stored, shared between commands.

    cache.py      the content-addressed tile cache: one PNG per rendered (snapshot, layer,
                  channel, settings), keyed by everything that decides its pixels
    plan.py       TileRequest, plan_jobs: the tiles a command needs minus the cached ones,
                  cut into TileJobs (one snapshot, up to a batch of channels)
    executors.py  make_executor, run_jobs: run a plan here (LocalExecutor) or on a Ray
                  cluster (RayExecutor), writing each tile into the cache as its job ends
"""
