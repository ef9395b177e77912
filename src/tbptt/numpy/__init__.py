"""The numpy engine: the seed's model (elman.py) trained by a shell (trainer.py, tbptt.TBPTT)
holding one rule per method (tbptt.py, rtrl.py, uoro.py, artbp.py), the readable reference that
the torch engine (tbptt.torch) mirrors file for file. The public names are tbptt's: tbptt.TBPTT,
tbptt.ElmanRNN, tbptt.gradients, tbptt.RTRL, ... (SEMANTICS.md 1-8)."""
