from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def davis_real_root() -> Path:
    """Eight real DAVIS sequences in the official layout, shipped beside the repository."""
    root = SHARED / "data" / "davis-real"
    if not root.is_dir():
        pytest.skip(f"real DAVIS sample not found at {root}")
    return root


@pytest.fixture(scope="session")
def jhmdb_real_root() -> Path:
    """One real JHMDB clip (40 frames, 15 joints) in the official layout, shipped beside the repository."""
    root = SHARED / "data" / "jhmdb-real"
    if not root.is_dir():
        pytest.skip(f"real JHMDB clip not found at {root}")
    return root


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
