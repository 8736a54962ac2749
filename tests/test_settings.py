"""A flag that changes what is generated cannot be added without joining the cache settings: every Config field is
either one of the settings (in a tuple run_settings reads, or added by run_settings itself) or named here as a
run-only field, and each setting changes the id its caches are recorded with."""

import dataclasses

import enhance_captions as ec

# Added to the settings by run_settings's own code, not through a tuple.
DERIVED_SETTINGS = ("local_llm", "model", "system_prompt", "variants", "verify", "verify_prompt", "vlm_base_url")

# Fields that change how a run goes, never the text it writes.
NOT_SETTINGS = (
    "dataset_dir", "trust_remote_code", "write_captions", "base_url", "model_from_list", "api_key",
    "local_llm_by_default", "set_aside_base_url", "vlm_api_keys", "vlm_rpm", "cache_generated", "caption_extension",
    "rpm", "tpm", "concurrency", "batch_size", "num_workers", "overlap", "attn_implementation", "device_map",
    "max_retries", "timeout", "give_up_after", "limit", "overwrite", "refresh", "dry_run", "export", "audit",
    "report", "verbosity",
)

TUPLES = (ec.VISION_SETTINGS, ec.SERVED_VISION_SETTINGS, ec.MERGE_SETTINGS, ec.LOCAL_LLM_SETTINGS,
          ec.FINISH_SETTINGS)


def other(value):
    """Another value of the same field."""
    if value is None:
        return "other"
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, tuple):
        return (("other", "another system prompt"),)
    return f"{value}-other"


def test_every_config_field_is_a_setting_or_named_as_run_only():
    fields = {f.name for f in dataclasses.fields(ec.Config)}
    settings = set(DERIVED_SETTINGS).union(*TUPLES)
    assert not settings & set(NOT_SETTINGS)
    unplaced = fields - settings - set(NOT_SETTINGS)
    assert not unplaced, (f"{sorted(unplaced)}: a new Config field must join the cache settings (a tuple beside "
                          "run_settings) or, if it never changes a cache's text, NOT_SETTINGS here")
    assert settings | set(NOT_SETTINGS) <= fields  # no stale names


def test_each_setting_changes_the_settings_of_its_caches(tmp_path):
    local = ec.Config(dataset_dir=tmp_path, verify="on", verify_prompt="check it")
    served = dataclasses.replace(local, vlm_base_url=("http://127.0.0.1:1/v1",), vlm_model="vlm")
    local_llm = dataclasses.replace(local, local_llm="some/llm")

    def vision(s):
        return s.vision_id

    def merge(s):
        return s.merge_ids

    def finish(s):
        return s.finish_id

    def any_id(s):
        return s.vision_id, s.merge_ids, s.finish_id, s.check_id

    cases = [(local, ec.VISION_SETTINGS, vision), (served, ec.SERVED_VISION_SETTINGS, vision),
             (local, ec.MERGE_SETTINGS, merge), (local_llm, ec.LOCAL_LLM_SETTINGS, merge),
             (local, ec.FINISH_SETTINGS, finish), (local, [n for n in DERIVED_SETTINGS if n != "verify"], any_id),
             (dataclasses.replace(local, verify=None), ("verify",), any_id)]
    for base, names, settings_id in cases:
        for name in names:
            changed = dataclasses.replace(base, **{name: other(getattr(base, name))})
            assert settings_id(ec.run_settings(changed)) != settings_id(ec.run_settings(base)), \
                f"--{name} does not change the settings of its caches"


def test_a_run_only_field_changes_no_setting(tmp_path):
    base = ec.Config(dataset_dir=tmp_path)
    for name in NOT_SETTINGS:
        changed = dataclasses.replace(base, **{name: other(getattr(base, name))})
        before, after = ec.run_settings(base), ec.run_settings(changed)
        assert (after.vision_id, after.merge_ids, after.finish_id, after.check_id) == \
            (before.vision_id, before.merge_ids, before.finish_id, before.check_id), f"--{name} changes the recorded settings: it belongs in a settings tuple"
