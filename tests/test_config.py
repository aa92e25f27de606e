"""LighthouseConfig validation: every rule of LIGHTHOUSE.md s.2 raises with its numbers."""

import pytest

from lh_cp import LighthouseConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(pool=3, levels=3, topk=256, tile_budget=32),
            "pool must be a power of two >= 2, got pool=3",
        ),
        (
            dict(pool=1, levels=3, topk=256, tile_budget=32),
            "pool must be a power of two >= 2, got pool=1",
        ),
        (dict(pool=4, levels=0, topk=256, tile_budget=32), "levels must be >= 1, got levels=0"),
        (dict(pool=4, levels=3, topk=256, tile_budget=7), "tile_budget must be even and >= 2"),
        (
            dict(pool=4, levels=3, topk=250, tile_budget=32),
            "topk % tile_budget == 0 fails for topk=250, tile_budget=32",
        ),
        (dict(pool=4, levels=3, topk=0, tile_budget=32), "topk must be a positive multiple"),
        (
            dict(pool=4.0, levels=3, topk=256, tile_budget=32),
            "LighthouseConfig.pool must be an int",
        ),
    ],
)
def test_invalid_config_raises_naming_the_rule(kwargs, message):
    with pytest.raises(ValueError) as err:
        LighthouseConfig(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "n, message",
    [
        # T = 1000 * 32 / 256 = 125: not whole.
        (1001, "N % T == 0 fails"),
        # T = 1000 * 32 / 256 = 125: whole, but not a multiple of 4**2 = 16.
        (
            1000,
            "T % pool**(levels-1) == 0 fails: tile size T=125 (N=1000) is not a multiple of "
            "pool**(levels-1) = 4**2 = 16",
        ),
        # T = 2048 * 32 / 256 = 256; 256 / 16 = 16 < 32 entries at the coarsest level.
        (
            2048,
            "T / pool**(levels-1) >= tile_budget fails: the coarsest level of a tile has 256 / "
            "16 = 16 entries, fewer than tile_budget=32",
        ),
        (0, "sequence length must be >= 1"),
    ],
)
def test_invalid_length_raises_naming_the_rule(n, message):
    cfg = LighthouseConfig(pool=4, levels=3, topk=256, tile_budget=32)
    with pytest.raises(ValueError) as err:
        cfg.tile_size(n)
    assert message in str(err.value)


def test_paper_configuration_tile_size():
    # LIGHTHOUSE.md s.2: T = 8192 at N = 98304, topk = 1536, b = 128.
    cfg = LighthouseConfig(pool=4, levels=3, topk=1536, tile_budget=128)
    assert cfg.tile_size(98304) == 8192
    assert cfg.selected_length(98304) == 98304 // 16 + 2 * 4 * 1536


def test_levels_one_is_allowed():
    cfg = LighthouseConfig(pool=2, levels=1, topk=4, tile_budget=2)
    assert cfg.tile_size(16) == 8
    assert cfg.selected_length(16) == 16


def test_every_lighthouse_field_reaches_the_recipe_and_torchtitan():
    """One declaration: each LighthouseConfig field is a [lighthouse] recipe key with the same
    default, a --set of it reaches the config the layers run with, and torchtitan's inner
    attention is built with that config. A field added to LighthouseConfig alone passes."""
    import dataclasses

    from lh_cp.train.recipe import LighthouseSection, recipe_from_dict

    defaults = LighthouseConfig()
    section_fields = {f.name: f for f in dataclasses.fields(LighthouseSection)}
    # a value other than the default, valid with the others (topk stays a multiple of budget)
    changed = {
        "pool": 2,
        "levels": 2,
        "topk": 256,
        "tile_budget": 64,
        "selection": "causal",
        "min_document_tokens": 7,
        "scorer": "dilated",
        "dilation": 8,
        "rope": "entries",
    }
    for field in dataclasses.fields(LighthouseConfig):
        assert field.name in section_fields, field.name
        assert section_fields[field.name].default == getattr(defaults, field.name), field.name
        assert field.name in changed, f"add a non-default value for {field.name} to this test"

    def overrides_of(values: dict) -> list[str]:
        return [
            f"lighthouse.{k}={v!r}" if isinstance(v, str) else f"lighthouse.{k}={v}"
            for k, v in values.items()
        ]

    # rope='entries' works with scorer='norm' only: each goes with the other at its default.
    scorer_changed = {**changed, "rope": "tokens"}
    rope_changed = {**changed, "scorer": "norm"}
    recipes = {}
    for name, values in (("scorer", scorer_changed), ("rope", rope_changed)):
        recipes[name] = recipe_from_dict({}, overrides_of(values))
        assert recipes[name].lighthouse.config() == LighthouseConfig(**values)
    try:
        from lh_cp.torchtitan.model import _inner_attention
        from lh_cp.torchtitan.stage import StageOptions
    except ImportError:  # torchtitan is an optional extra
        return
    # torchtitan rotates q and k before its inner attention: rope="entries" is refused there.
    with pytest.raises(ValueError, match="rope='entries' is not available with torchtitan"):
        _inner_attention("lighthouse", recipes["rope"].lighthouse, StageOptions())
    inner = _inner_attention("lighthouse", recipes["scorer"].lighthouse, StageOptions())
    assert inner.lighthouse == LighthouseConfig(**scorer_changed)
