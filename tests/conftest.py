import re
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_data(name: str, what: str) -> Path:
    """A folder of ../shared/data, or a skip saying which sample is missing."""
    root = SHARED / "data" / name
    if not root.is_dir():
        pytest.skip(f"{what} not found at {root}")
    return root


@pytest.fixture(scope="session")
def davis_real_root() -> Path:
    """Eight real DAVIS sequences in the official layout, shipped beside the repository."""
    return shared_data("davis-real", "real DAVIS sample")


@pytest.fixture(scope="session")
def jhmdb_real_root() -> Path:
    """One real JHMDB clip (40 frames, 15 joints) in the official layout, shipped beside the repository."""
    return shared_data("jhmdb-real", "real JHMDB clip")


# A line Ray's log monitor forwards from its processes to the driver's stderr: "(raylet) ...", "(pid=12) ...",
# "(RayTrainWorker pid=12, ip=...) ...", coloured or not. They come whenever a Ray process logs (a CI machine's disk
# over 95 % full made the raylet warn in the middle of a sweep's one-line error), so they are not the command's output.
RAY_FORWARDED = re.compile(r"(?:\x1b\[[0-9;]*m)?\((?:raylet|autoscaler|[^()\n]*\bpid=\d+[^()\n]*)\)")


@pytest.fixture
def stderr(capsys):
    """Reads what was printed to stderr since the last read, without the lines Ray forwarded from its processes."""

    def read() -> str:
        lines = capsys.readouterr().err.splitlines(keepends=True)
        return "".join(line for line in lines if not RAY_FORWARDED.match(line))

    return read


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session: 2 CPUs, as on the smallest laptop."""
    import ray

    from stt.train import start_ray

    # The dashboard runs as in real use: Tune's ASHA relies on it to release stopped trials' resources.
    start_ray(num_cpus=2, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared, loaded machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
