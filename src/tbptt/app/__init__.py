"""The `tbptt` command line: the application built on the library (nothing in the library
imports it).

    cli.py              the dispatcher: one subcommand per job, one-line errors for bad input
    config.py           `tbptt train`'s configuration: one dataclass, TOML file and flags
    data.py, tasks.py   corpora, text and numeric files, synthetic tasks as batches of streams
    engines.py          the Engine protocol the loop calls, and its numpy and torch engines
    rundir.py           the run directory: creation, lock, checkpoints, metrics
    train.py            `tbptt train`: the training loop
    sample.py           `tbptt sample`: text from a trained character model
    explain_command.py  `tbptt explain`
    bias_commands.py    `tbptt bias` and `tbptt suggest-k`
    plots.py            every figure the command draws
"""
