"""Import-time checks of the pinned stack: fbgemm-gpu must load, and the message must name the right wheel."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from typing import Dict, Optional


class EnvironmentCheckError(ImportError):
    pass


class _DropFbgemmCompatNoise(logging.Filter):
    # fbgemm-gpu 1.6.0 logs one "no entry in _fbgemm_torch_compat_table" warning per library it loads.
    def filter(self, record: logging.LogRecord) -> bool:
        return "_fbgemm_torch_compat_table" not in str(record.msg)


# The same filter for every process of an environment, whatever it imports first (torchrec loads fbgemm
# before this package can filter): a .pth line runs at interpreter start-up; it imports only `logging`.
QUIET_PTH = "torchrec_hps_quiet_fbgemm.pth"
QUIET_PTH_LINE = ('import logging; logging.getLogger().addFilter('
                  'lambda r: "_fbgemm_torch_compat_table" not in str(r.msg))\n')


def install_quiet_hook(site_dir: Optional[str] = None) -> str:
    """Write the .pth start-up hook into `site_dir` (default: this environment's site-packages); its path."""
    import os
    import sysconfig

    path = os.path.join(site_dir or sysconfig.get_paths()["purelib"], QUIET_PTH)
    with open(path, "w") as f:
        f.write(QUIET_PTH_LINE)
    return path


def _has_nvidia_driver() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def load_fbgemm() -> None:
    """Import fbgemm_gpu (it registers the TBE ops torchrec and this package call), or explain the fix."""
    root = logging.getLogger()
    noise = _DropFbgemmCompatNoise()
    root.addFilter(noise)
    try:
        import fbgemm_gpu  # noqa: F401
    except Exception as e:  # OSError (missing libcuda) or ImportError
        wheel = "fbgemm-gpu==1.6.0" if _has_nvidia_driver() else "fbgemm-gpu-cpu==1.6.0"
        raise EnvironmentCheckError(
            f"torchrec_hps needs fbgemm_gpu, which failed to load ({type(e).__name__}: {e}). "
            f"On this machine install `{wheel}` (the CUDA wheel fbgemm-gpu loads only with an NVIDIA driver; "
            "use fbgemm-gpu-cpu on CPU hosts), then torchrec==1.6.1 with --no-deps: `make install` does both."
        ) from e
    finally:
        root.removeFilter(noise)


def check_environment(verbose: bool = False) -> Dict[str, str]:
    """Load the stack and return its versions; raises EnvironmentCheckError naming what is wrong."""
    import importlib.metadata as md

    import torch

    load_fbgemm()
    try:
        import torchrec  # noqa: F401
    except Exception as e:
        raise EnvironmentCheckError(f"torchrec failed to import: {e}; install torchrec==1.6.1 --no-deps") from e
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for dist in ("torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "redis", "rocksdict", "confluent-kafka"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    versions["cuda"] = str(torch.cuda.is_available())
    if verbose:
        print("environment ok: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return versions


if __name__ == "__main__":  # `python torchrec_hps/_env.py`: writes the hook without importing the package
    print(install_quiet_hook())
