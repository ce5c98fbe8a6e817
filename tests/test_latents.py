import pytest
import torch

from latentsd.latents import decode, encode


@torch.no_grad()
def test_encode_scales_and_decode_inverts_the_scale(tiny):
    vae = tiny.vae
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    mode = encode(vae, pixels, sample=False)
    torch.testing.assert_close(mode, vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor)
    sampled = encode(vae, pixels, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 4, 8, 8) and not torch.allclose(sampled, mode)
    torch.testing.assert_close(decode(vae, mode), vae.decode(mode / vae.config.scaling_factor).sample)


@torch.no_grad()
@pytest.mark.parametrize("slice_size", [1, 2, 5])
def test_sliced_decode_equals_full_decode(tiny, slice_size):
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(decode(tiny.vae, z, slice_size=slice_size), decode(tiny.vae, z), atol=1e-5, rtol=0)


@torch.no_grad()
def test_tiled_decode_of_a_large_latent(tiny):
    vae = tiny.vae
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(2))
    full = decode(vae, z)
    old = vae.tile_sample_min_size, vae.tile_latent_min_size
    try:
        vae.tile_sample_min_size, vae.tile_latent_min_size = 256, 32  # one tile covers it: same as full
        torch.testing.assert_close(decode(vae, z, tiled=True), full, atol=1e-5, rtol=0)
        vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8  # 3x3 overlapping tiles
        tiled = decode(vae, z, tiled=True)
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = old
    assert tiled.shape == full.shape == (1, 3, 192, 192) and torch.isfinite(tiled).all()
    assert not torch.allclose(tiled, full)  # really decoded in tiles


def test_bad_slice_size(tiny):
    with pytest.raises(ValueError, match="slice_size"):
        decode(tiny.vae, torch.zeros(1, 4, 8, 8), slice_size=0)
