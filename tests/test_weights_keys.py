"""Our FLUX key table against diffusers' own single-file converter, on FLUX.1-dev geometry."""

from __future__ import annotations

import torch

from weights import flux_keys

FLUX_DEV = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
            "guidance_embeds": True}


def test_table_equals_diffusers_converter():
    """Row-index proxies ([rows, 1] tensors) stand in for the 12B weights: same names, same rows."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    entries = flux_keys.table(FLUX_DEV)
    rows = {}
    for _, bfl, r in entries:
        end = 0 if r in (None, "swap") else r[1]
        rows[bfl] = max(rows.get(bfl, 0), end)
    rows = {k: v or 64 for k, v in rows.items()}  # unsplit tensors: any row count
    rows["final_layer.adaLN_modulation.1.weight"] = rows["final_layer.adaLN_modulation.1.bias"] = 6144
    proxy = {k: torch.arange(n, dtype=torch.float64).reshape(n, 1) + 1e6 * i for i, (k, n) in enumerate(sorted(rows.items()))}
    theirs = convert_flux_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v for k, v in proxy.items()})
    ours = flux_keys.to_diffusers(dict(proxy), FLUX_DEV)
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_round_trip_on_tiny_geometry():
    from tests.weights_fixtures import tiny_transformer

    model = tiny_transformer()
    sd = {k: v for k, v in model.state_dict().items()}
    back = flux_keys.to_diffusers(flux_keys.to_bfl(sd, dict(model.config)), dict(model.config))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_wan_original_names_round_trip_through_diffusers_converter():
    """Every name of a tiny Wan 2.1 I2V model, written as Kijai / Comfy-Org files name it, is renamed back
    by diffusers' own convert_wan_transformer_to_diffusers (what weights.wan_keys calls)."""
    from tests.weights_fixtures import tiny_wan, wan_original
    from weights import wan_keys

    names = list(tiny_wan().state_dict())
    original = {wan_original(k): k for k in names}
    assert len(original) == len(names) and not any(o == d and "blocks." in o and ".attn" in o for o, d in original.items())
    assert {"blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k_img.weight", "blocks.0.ffn.0.weight",
            "blocks.0.norm3.weight", "blocks.0.modulation", "head.head.weight", "head.modulation",
            "patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
            "time_projection.1.weight", "img_emb.proj.1.weight"} <= set(original)
    assert wan_keys.renamed(original) == {d: o for o, d in original.items()}
