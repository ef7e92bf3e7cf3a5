"""Experiment drivers and the commands that run the library end to end (top layer: they parse
arguments and call the library; nothing in the library imports them).

    python -m antiphon.experiments.switch            # Switch Generation: results/switch.*
    python -m antiphon.experiments.train_switcher    # `antiphon train switcher`
"""
