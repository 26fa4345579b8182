"""Device runs only (put this folder on PYTHONPATH, set ASAP_FH_DIR): every Python process dumps all its
threads' stacks to ASAP_FH_DIR/fh-PID.log every ASAP_FH_S seconds (default 25), to see where a hang sits."""

import faulthandler
import os
import sys

_dir = os.environ.get("ASAP_FH_DIR")
if _dir:
    os.makedirs(_dir, exist_ok=True)
    _file = open(os.path.join(_dir, f"fh-{os.getpid()}.log"), "w")  # noqa: SIM115
    _file.write(" ".join(sys.argv) + "\n")
    _file.flush()
    faulthandler.dump_traceback_later(float(os.environ.get("ASAP_FH_S", "25")), repeat=True, file=_file)
