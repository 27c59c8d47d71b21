import pytest

from utils.errors import InsufficientMemory
from utils.memory import available_bytes, check_fits


def test_check_fits_refuses_with_estimate_available_and_largest():
    avail = available_bytes()
    assert avail > 0
    assert check_fits(1024, "a tiny run") == pytest.approx(avail, rel=0.5)
    with pytest.raises(InsufficientMemory, match=r"a huge run needs about .* GiB but .* GiB is available.*"
                                                 r"the largest that fits: --batch-size 8"):
        check_fits(100 * avail, "a huge run", largest="--batch-size 8")
    with pytest.raises(MemoryError):   # a MemoryError, so callers that catch those still do
        check_fits(100 * avail, "a huge run")
