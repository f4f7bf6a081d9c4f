"""Feature visualization in Lucid's style: small composable pieces.

    settings.py     RenderSettings: every option that decides a picture, with its default
    param.py        the image parameterization (1/f Fourier spectrum with decorrelated colour, or pixels)
    transforms.py   Lucid's random pad, jitter, scale and rotation
    objectives.py   what an image maximizes; objectives add and scale (channel() - 0.5 * channel("x", 7))
    engine.py       render(model, targets, settings): many targets optimized together, one loop
    lucid.py        Lucid's method as a plan for that loop (parameterization + transforms)
    maco.py         MACO: phase only, a natural magnitude spectrum, random noisy crops
    accent.py       feature accentuation: start from a photo, held near it
    pair.py         two networks as one (NetworkPair): what a channel gained and lost between them

    from featureshift.optvis.engine import render
    result = render(model, [("inception4a", 3), ("inception4c", 7)], steps=64, size=128, seed=0)
    result.images  # (2, 128, 128, 3) float32 in [0, 1]
"""
