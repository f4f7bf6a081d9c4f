"""How much each layer and each channel changed between two snapshots.

Five families of measures, all defined in docs/metrics.md:

- weights: relative change ||W_b - W_a|| / ||W_a|| of the parameters that produce a
  layer's channels;
- function: how far each layer's output on the same inputs moved, relative to its size
  (median over its channels), the measure that ranks layers against each other;
- representations on a fixed probe set: linear CKA per layer (minibatch, unbiased
  HSIC) and, per channel, the correlation across probe images of its spatially
  pooled activation, each with a seeded bootstrap interval over the probe images;
- visual drift: a texture distance between a channel's renders at the two snapshots;
- cross-activation: how strongly one snapshot's channel fires on the other
  snapshot's render, relative to its own;

and for the render measures, a render-noise floor per layer (what two renders of the same
snapshot with other seeds give): a channel is called changed only beyond it.

    sources.py      which parameters make each channel of a layer, found by tracing (any architecture)
    weights.py      weight_change: relative weight change per layer and per channel
    function.py     function_change: how differently each layer computes on the same inputs
    probe.py        the probe set and its per-snapshot statistics (probe_stats), cached on disk
    similarity.py   cka, channel_correlation: representation measures from two snapshots' statistics,
                    and their bootstrap intervals over the probe images (cka_interval, correlation_interval)
    drift.py        visual_drift, cross_activation: measures from the channel's renders
    floors.py       noise_floor: the render-noise floors of a layer from second renders, count_beyond_noise
    examples.py     dataset examples: the probe images that activate a channel most, with a crop, and
                    those whose activation rose and fell most between two snapshots (shifted_examples)
    retention.py    example retention: does a channel still fire most on the reference's top examples,
                    with its bootstrap interval over the probe images
    checks.py       self-checks of every rendered tile against the probe images (vs. data, views,
                    agreement) and its verdict, for RUN/metrics/checks.csv and the report's badges
    driver.py       run_metrics: every measure of a training run, written to RUN/metrics/
    adaptation.py   speed of adaptation, dead channels, reuse (kept / repurposed / died) from run_metrics' rows
    spatial.py      dominant spatial frequency of a render and its change (coarsening)
    answers.py      analyse_layer: the paper's questions per layer (speed, fates, scale), and
                    rank_layers: which layers changed most, for the report and compare-runs alike
"""
