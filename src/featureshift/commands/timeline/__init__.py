"""`featureshift timeline`: the same channels rendered on every snapshot of a run.

    timeline.py   timeline(run_dir, layers, channels, ...): rows, merged.png and GIFs per layer
    hook.py       SnapshotVisualizer: the train hook that keeps a timeline current while training
"""
