"""User errors: what the CLI prints of them."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from latentflow.errors import LatentflowError, user_message


class _Refusing(IterableDataset):
    def __iter__(self):
        raise LatentflowError("potential CACHE/ot/x: fitted on another cache; refit it with latentflow ot-fit")
        yield torch.zeros(1)


def test_an_error_raised_in_a_loader_worker_is_printed_as_the_worker_raised_it() -> None:
    with pytest.raises(LatentflowError) as caught:
        next(iter(DataLoader(_Refusing(), batch_size=None, num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # torch's wrapping, which the CLI printed whole before
    assert user_message(caught.value) == ("potential CACHE/ot/x: fitted on another cache; refit it with latentflow "
                                          "ot-fit")
    plain = LatentflowError("data.cache: set the latent cache folder")
    assert user_message(plain) == "data.cache: set the latent cache folder"
