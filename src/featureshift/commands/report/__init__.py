"""`featureshift report RUN`: the static HTML report of a training run.

    builder.py     build_report(run_dir, ...): renders and measures what is missing, writes RUN/report/
    plots.py       the SVG plots (training curves, change over epochs)
    templates/     the Jinja pages, stylesheet and script
"""
