"""Issue 18: a generation flag cannot be added without joining the cache settings.

Every field of Config either changes the settings that run_settings() records with each cache (so that
`--refresh settings` redoes what it changed), or is named below with the reason it changes no cache's text.
A new field in neither place fails this test."""
from __future__ import annotations

import dataclasses

import pytest

import enhance_captions as ec

# Fields that change no cache's text: where the work happens, how fast, how it is reported, what is done this run.
NOT_SETTINGS = {
    "dataset_dir", "caption_extension", "limit", "overwrite", "refresh", "dry_run", "audit", "report", "verbosity",
    "export", "write_captions",  # copies of the finished caption for a trainer, made from the recorded caches
    "cache_generated",  # whether the vision caption is kept on disk, not what it says
    "trust_remote_code", "attn_implementation", "device_map", "batch_size", "num_workers", "overlap",
    "base_url", "vlm_base_url", "api_key", "vlm_api_keys", "model_from_list", "local_llm_by_default",
    "set_aside_base_url",  # servers of one model, and how they were found: the model is the setting
    "rpm", "tpm", "vlm_rpm", "concurrency", "max_retries", "timeout", "give_up_after",
}


def changed(field: dataclasses.Field, value):
    """Another value of the field's type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, tuple):
        return (("other", "another prompt"),)
    if value is None and field.type.startswith("float"):
        return 1.5
    if value is None and field.type.startswith("int"):
        return 7
    return f"{value or ''}other"


def settings(cfg: ec.Config) -> dict:
    return vars(ec.run_settings(cfg))


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(ec.Config) if f.name not in NOT_SETTINGS],
                         ids=lambda f: f.name)
def test_every_generation_field_is_a_cache_setting(tmp_path, field):
    common = dict(dataset_dir=tmp_path, system_prompt="merge these", verify_prompt="check this")
    bases = [
        ec.Config(**common, model="llm"),  # local vision model, an endpoint's LLM
        ec.Config(**common, model="llm", verify="on"),
        ec.Config(**common, vlm_base_url=("http://127.0.0.1:1/v1",), vlm_model="vlm", local_llm="local"),  # served
    ]
    differs = [settings(dataclasses.replace(base, **{field.name: changed(field, getattr(base, field.name))}))
               != settings(base) for base in bases]
    assert any(differs), f"Config.{field.name} changes no cache setting: add it to run_settings() or NOT_SETTINGS"


def test_not_settings_names_only_config_fields():
    assert NOT_SETTINGS <= {f.name for f in dataclasses.fields(ec.Config)}
