"""Engine layer: how render work is stored and shared between commands.

    cache.py    the content-addressed tile cache: one PNG per rendered (snapshot, layer,
                channel, settings), keyed by everything that decides its pixels
"""
