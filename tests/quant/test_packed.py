"""int4 packing and the tinygemm-style asymmetric numerics: exact round trips."""
from __future__ import annotations

import pytest
import torch

from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import dequantize, fake_quantize, qparams, quantize
from fxquant.quant.packed import pack_int4, unpack_int4


def test_every_pair_of_int4_codes_round_trips_through_one_byte():
    codes = torch.cartesian_prod(torch.arange(16), torch.arange(16)).to(torch.uint8)  # [256, 2]
    packed = pack_int4(codes)
    assert packed.shape == (256, 1) and packed.dtype == torch.uint8
    assert len(set(packed.flatten().tolist())) == 256  # every byte value used once
    assert torch.equal(unpack_int4(packed), codes)
    assert packed[1, 0] == 0x10 and packed[16, 0] == 0x01  # element 0 is the low nibble


def test_packing_refuses_odd_widths_and_out_of_range_codes():
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[16, 0]]))


@pytest.mark.parametrize("symmetric,group", [(True, None), (False, 32), (True, 64)])
def test_packed_codes_dequantize_to_exactly_the_fake_quantized_weight(symmetric, group):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    fmt = QuantFormat(4, symmetric, group, "int")
    scale, zero = qparams(w, fmt)
    codes = quantize(w, scale, zero, fmt)
    offset = 8 if symmetric else 0  # signed codes are stored offset to 0..15
    stored = pack_int4((codes + offset).to(torch.uint8))
    assert stored.numel() == w.numel() // 2
    back = dequantize(unpack_int4(stored).float() - offset, scale, zero, fmt)
    assert torch.equal(back, fake_quantize(w, fmt))


def test_tinygemm_numerics_match_their_definition_and_pack_exactly():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    fmt = QuantFormat(4, False, 32, "float")
    scale, zero = qparams(w, fmt)
    g = w.reshape(16, 4, 32)
    torch.testing.assert_close(scale, ((g.amax(-1, True) - g.amin(-1, True)) / 15).clamp_min(1e-6))
    torch.testing.assert_close(zero, g.amin(-1, True) + 8 * scale)
    codes = quantize(w, scale, zero, fmt)  # signed: u - 8
    assert codes.min() >= -8 and codes.max() <= 7
    unsigned = torch.round((g - g.amin(-1, True)) / scale).clamp(0, 15).reshape(w.shape)  # tinygemm's definition
    assert torch.equal(codes + 8, unsigned)
    back = dequantize(unpack_int4(pack_int4((codes + 8).to(torch.uint8))).float() - 8, scale, zero, fmt)
    assert torch.equal(back, fake_quantize(w, fmt))
    torch.testing.assert_close(back, ((unsigned - 8).reshape(g.shape) * scale + zero).reshape(w.shape), rtol=0, atol=0)
    # the group min and max are represented (up to one rounding of the float zero)
    assert (back - w).abs().max() <= 0.5 * scale.max() + 1e-6
    flat = torch.full((2, 32), 0.25)  # a constant group: the eps scale keeps it finite, within float rounding
    assert (fake_quantize(flat, fmt) - flat).abs().max() <= 1e-6
