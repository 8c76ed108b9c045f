"""`python crash_after_checkpoint.py STEP <talklora_exp args>`: the CLI, killed (os._exit, like SIGKILL: no cleanup,
no final metrics) right after the checkpoint of STEP is on disk. Run under torchrun to crash a multi-process run."""

import os
import sys

from talklora_exp import checkpoint as ckpt
from talklora_exp.cli import main

crash_step = int(sys.argv.pop(1))
real_save = ckpt.save


def save_then_die(root, step, state):  # noqa: ANN001, ANN201 - the signature of checkpoint.save
    out = real_save(root, step, state)
    if step == crash_step:
        os._exit(137)
    return out


ckpt.save = save_then_die
main()
