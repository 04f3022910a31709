"""summary.json's typed sections: written once per stage, the others kept, read by field, old files readable."""

import json

import pytest

from cxrmem.runfiles import Run, RunLayout
from cxrmem.storage import Store
from cxrmem.summary import BY_NAME, AttributionSection, AuditSection, MitigationSection, RunSummary


def _mitigation(seconds=4.5):
    return MitigationSection(strategies={"original": {}}, prompts=3, n_generations=2, seconds=seconds, mitigation="m.parquet")


def test_a_section_replaces_only_itself_and_reads_back_by_field(tmp_path):
    store, layout = Store(), RunLayout(str(tmp_path))
    open(layout.summary, "w").write(json.dumps({"score": {"anything": 1}}))  # a key no section owns survives
    run = Run(store, layout)
    run.write_sections(_mitigation())
    run.write_sections(AuditSection(output="o", scoring={}, memorized_count=3, threshold=2.0, timings_s={"score": 1.0}))
    run.write_sections(_mitigation(seconds=9.0))  # a rerun of the stage replaces its section
    on_disk = json.loads(open(layout.summary).read())
    assert set(on_disk) == {"score", "mitigation", "audit"} and on_disk["mitigation"]["seconds"] == 9.0
    summary = run.read_summary()
    assert summary.mitigation == _mitigation(seconds=9.0) and summary.audit.threshold == 2.0
    assert summary.analysis is None and summary.copies is None
    run.write_sections(clear=("mitigation",))
    assert run.read_summary().mitigation is None
    with pytest.raises(ValueError, match="no section \\['mitigate'\\]"):
        run.write_sections(clear=("mitigate",))


def test_an_older_file_reads_with_defaults_and_a_newer_one_without_its_new_keys():
    old = AttributionSection.from_json({"prompts": 4, "prompts_with_marker": 2, "seconds": 1.5})  # before the null model
    assert old.null is None and old.null_seconds is None and old.tokens is None and old.prompts == 4
    newer = AttributionSection.from_json({"prompts": 4, "seconds": 1.5, "a_field_from_the_future": 7})
    assert not hasattr(newer, "a_field_from_the_future")


def test_timings_are_the_fields_each_section_declares_audit_first():
    summary = RunSummary(
        audit=AuditSection(output="o", scoring={"prompts_per_s": 12.0}, memorized_count=1, threshold=1.0,
                           timings_s={"score": 3.0, "mitigate": 5.0}),
        mitigation=_mitigation(seconds=4.5),
    )
    timings = summary.timings()
    # the audit's wall time of the stage wins over the stage's own (one row per label)
    assert timings == {"score: seconds": 3.0, "mitigate: seconds": 5.0, "score: prompts/s": 12.0}
    assert RunSummary(mitigation=_mitigation()).timings() == {"mitigate: seconds": 4.5}


def test_every_section_name_is_one_runsummary_field():
    assert list(BY_NAME) == [f for f in RunSummary.__dataclass_fields__]
