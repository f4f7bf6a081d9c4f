"""The report's engine behind `featureshift report` (commands/report.py, which decides what to
render and measure).

    site.py        write_site(out, inputs): the pages, pictures and plots from a ReportInputs
    analysis.py    what the numbers mean: findings, the most changed channels, scale phrases
    plots.py       the SVG plots (training curves, change over epochs)
    templates/     the Jinja pages, stylesheet and script
"""
