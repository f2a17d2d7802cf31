"""The demo's config writer: what it writes, tomllib reads back unchanged."""

from __future__ import annotations

import tomllib

from train.demo import DemoSizes, cache_config, to_toml, train_config


def test_a_dotted_dataset_name_round_trips_through_the_demo_writer() -> None:
    config = {
        "datasets": [{"name": "a.b", "kind": "folder", "root": "data/a.b", "domain": "2d"}],
        "data": {"roots": {"a.b": "/new/a.b", "plain": "/x"}, "teachers": []},
        "expect": {"dino.v2": "0" * 64},
    }
    back = tomllib.loads(to_toml(config))
    assert back == config
    assert "a" not in back["data"]["roots"]  # not a nested table {"a": {"b": ...}}


def test_demo_configs_round_trip_without_their_none_values() -> None:
    sizes = DemoSizes()
    dataset = {"name": "web2d", "kind": "folder", "root": "data/2d", "domain": "2d",
               "list_file": None}
    cache = cache_config(sizes, [dataset])
    back = tomllib.loads(to_toml(cache))
    assert back.pop("datasets") == [{k: v for k, v in dataset.items() if v is not None}]
    assert back == {k: v for k, v in cache.items() if k != "datasets"}
    assert tomllib.loads(to_toml(train_config(sizes))) == train_config(sizes)
