"""Engine layer: how render work is planned, run and stored, shared between commands.

    cache.py      the content-addressed tile cache: one PNG per rendered (snapshot, layer,
                  channel, settings), keyed by everything that decides its pixels
    plan.py       TileRequest, plan_jobs: the tiles a command needs minus the cached ones,
                  cut into TileJobs (one snapshot, up to a batch of channels); a request's
                  network is a saved state (by path) or a HeldNetwork (hold_network: a module
                  in memory, named by a checksum of its weights)
    executors.py  make_executor, run_jobs, render_tiles: run a plan here (LocalExecutor) or on
                  a Ray cluster (RayExecutor), writing each tile into the cache as its job
                  ends, with its header (tile_about, the only one); render_groups: several
                  settings on one executor
    floors.py     plan_floors, render_floors: the second renders (another seed) behind the
                  render-noise floors of metrics.floors, shared by the atlas and the report

Every render a command shows or keeps (vis, compare, timeline, atlas, the report's
accentuations) is asked for as TileRequests and made here; only the atlas's timing probe
calls the engine itself, and throws its pictures away.
"""
