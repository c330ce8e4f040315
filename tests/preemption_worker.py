"""One process of the two-process handler test in test_preemption.py (run as a script).

Usage: preemption_worker.py PORT PROCESS_ID CHECK_EVERY SIGNAL_PROCESS SIGNAL_STEP
Joins a 2-process `jax.distributed` job on 127.0.0.1:PORT, installs the preemption handler and
calls `should_stop(step)` once per step, as the train loop does; process SIGNAL_PROCESS sends
itself SIGTERM at SIGNAL_STEP. Prints one JSON line: the step at which should_stop first said
True (null if never) and whether this process itself got the signal.
"""

import json
import os
import signal
import sys
import time

import jax

from gptjax.training import checkpoint as ckpt_lib

MAX_STEPS = 40


def main(
    port: str, process_id: str, check_every: str, signal_process: str, signal_step: str
) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
    stopped = None
    with ckpt_lib.install_preemption_handler(check_every=int(check_every)) as handler:
        for step in range(1, MAX_STEPS + 1):
            if jax.process_index() == int(signal_process) and step == int(signal_step):
                os.kill(os.getpid(), signal.SIGTERM)
            if handler.should_stop(step):
                stopped = step
                break
            time.sleep(0.02)  # a "train step"; process 0 is not slowed down on purpose
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "stop_step": stopped,
                "requested": handler.requested,
                "signum": handler.signum,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
