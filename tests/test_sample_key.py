import hashlib
import struct

import pytest
import torch

from qtuning_plugin.sample_key import sample_key

pytestmark = pytest.mark.env_independent  # torch only: `make test` only


def test_key_is_sha256_of_little_endian_int64_ids():
    ids = [1, 70000, 3, 2**40]
    expected = hashlib.sha256(struct.pack("<4q", *ids)).hexdigest()[:16]
    assert sample_key(ids) == expected
    assert sample_key(torch.tensor(ids, dtype=torch.int32 if max(ids) < 2**31 else torch.int64)) == expected


def test_key_tells_order_and_length_apart():
    assert sample_key([1, 2]) != sample_key([2, 1])
    assert sample_key([1, 2]) != sample_key([1, 2, 0])
