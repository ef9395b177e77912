"""The mathematics behind tbptt's analysis tools: numpy only, no argparse, no printing.

    explain.py     what a schedule does: windows, per-loss use and depth, cost, as text
    bias.py        the gradient bias of a truncation against exact BPTT, per-lag decay, choosing k2
    influence.py   influence balancing (Tallec and Ollivier 2017), where truncation goes wrong
    influence_methods.py   the same system trained by RTRL, UORO and ARTBP
    estimators.py  bias, variance and cost of TBPTT, RTRL, UORO and ARTBP against exact BPTT

The `tbptt explain`, `bias` and `suggest-k` commands (tbptt/app/) print and plot what these
compute.
"""
