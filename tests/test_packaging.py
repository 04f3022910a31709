"""The cluster packaging and the README name only things that exist and accept what they are given.

Checks docker/Dockerfile (base image matches the pinned Ray and Python 3.11; the build context
keeps what it copies and drops .venv, runs/, testbed/), the KubeRay manifests (they parse; their
entry points exist; their configs and overrides load; both RayJobs share one cluster spec), and
README.md (every command in its code blocks names an existing stage, script, make target or
file and only flags that command accepts; every override and config key it shows is valid).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cxrmem.cli import BY_COMMAND
from cxrmem.config import default_config, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
RAYJOB = ROOT / "docker" / "rayjob.yaml"
CRONJOB = ROOT / "docker" / "rescore-cronjob.yaml"
README = ROOT / "README.md"
# `cxrmem` subcommands that are not stages of a run, with their sub-subcommands.
TOOL_COMMANDS = {"model": ["tiny"], "testbed": ["train", "evaluate", "export"]}
CLUSTER_JOBS = ["audit.py", "rescore.py"]  # the ray_jobs/ scripts the manifests run
FILE_SUFFIXES = {"html", "json", "csv", "parquet", "png", "yaml", "py", "txt"}


def pinned_ray_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text)
    assert match, "pyproject.toml must pin ray as ray[...]==X.Y.Z"
    return match.group(1)


def yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def rayjobs() -> dict[str, dict]:
    """The audit RayJob and the rescoring CronJob's RayJob template, by file."""
    (audit,) = yaml_docs(RAYJOB)
    configmaps = [d for d in yaml_docs(CRONJOB) if d["kind"] == "ConfigMap"]
    (template,) = [yaml.safe_load(text) for cm in configmaps for text in cm["data"].values()]
    return {"rayjob.yaml": audit, "rescore-cronjob.yaml": template}


def containers(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def workdir() -> str:
    (line,) = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("WORKDIR ")]
    return line.split()[1]


def entrypoint_parts(command: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(--config value, key=value overrides, --flags) of a command line's arguments."""
    config = None
    if "--config" in command:
        config = command[command.index("--config") + 1]
    overrides = [a for a in command if "=" in a and not a.startswith("-")]
    flags = [a for a in command if a.startswith("--")]
    return config, overrides, flags


# ---------------------------------------------------------------- help texts, gathered in parallel


@pytest.fixture(scope="module")
def help_texts() -> dict[str, str]:
    """`--help` of the audit and rescore jobs and of every cxrmem subcommand, run as subprocesses at once.

    (ray_jobs/train_testbed.py is left out: importing the trainer alone takes longer than the rest.)
    """
    commands = {f"ray_jobs/{job}": [sys.executable, f"ray_jobs/{job}", "--help"] for job in CLUSTER_JOBS}
    for stage in BY_COMMAND:
        commands[f"cxrmem {stage}"] = [sys.executable, "-m", "cxrmem.cli", stage, "--help"]
    for tool, subs in TOOL_COMMANDS.items():
        for sub in subs:
            commands[f"cxrmem {tool} {sub}"] = [sys.executable, "-m", "cxrmem.cli", tool, sub, "--help"]
    running = {
        name: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in commands.items()
    }
    texts = {}
    for name, process in running.items():
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"{name} --help failed:\n{out}"
        texts[name] = out
    return texts


def test_ray_job_scripts_accept_the_documented_arguments(help_texts):
    for script in ("ray_jobs/audit.py", "ray_jobs/rescore.py"):
        assert "--config" in help_texts[script] and "overrides" in help_texts[script]
    assert "--force" in help_texts["ray_jobs/rescore.py"]
    assert "--force" not in help_texts["ray_jobs/audit.py"]


# ---------------------------------------------------------------- Dockerfile and build context


def test_dockerfile_base_matches_pinned_ray_and_python():
    (base,) = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM ")]
    image, tag = base.split(":")
    assert image == "rayproject/ray"
    version, python, platform = tag.split("-")
    assert version == pinned_ray_version()
    assert python == "py311"
    assert re.fullmatch(r"cu\d+|gpu", platform), f"{base} is not a GPU image"


def dockerignore_keeps(path: str) -> bool:
    """Whether `path` enters the build context under .dockerignore (last matching rule wins)."""
    keep = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            keep = negated
    return keep


def test_build_context_keeps_what_the_dockerfile_copies_and_nothing_heavy():
    copied = [
        src
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ")
        for src in [a for a in line.split()[1:] if not a.startswith("--")][:-1]
    ]
    assert copied, "the Dockerfile copies nothing"
    for src in copied:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
        assert dockerignore_keeps(src), f".dockerignore drops {src}, which the Dockerfile copies"
    assert dockerignore_keeps("cxrmem/scoring/dmem.py")
    for heavy in (".venv/bin/python", "runs/demo/scores.parquet", "testbed/model/unet/x.safetensors",
                  ".git/HEAD", "cxrmem/__pycache__/cli.cpython-311.pyc", "tests/test_config.py"):
        assert not dockerignore_keeps(heavy), f"{heavy} would enter the build context"


# ---------------------------------------------------------------- KubeRay manifests


def test_manifests_parse_into_the_expected_objects():
    assert [d["kind"] for d in yaml_docs(RAYJOB)] == ["RayJob"]
    kinds = [d["kind"] for d in yaml_docs(CRONJOB)]
    assert sorted(kinds) == sorted(["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"])


@pytest.mark.parametrize("name", ["rayjob.yaml", "rescore-cronjob.yaml"])
def test_rayjob_entrypoint_script_config_and_overrides(name, help_texts):
    rayjob = rayjobs()[name]
    spec = rayjob["spec"]
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert spec["shutdownAfterJobFinishes"] is True
    command = shlex.split(spec["entrypoint"])
    assert command[0] == "python"
    script = command[1]
    expected = "ray_jobs/audit.py" if name == "rayjob.yaml" else "ray_jobs/rescore.py"
    assert script == expected and (ROOT / script).is_file()
    config, overrides, flags = entrypoint_parts(command[2:])
    assert config is not None and (ROOT / config).is_file(), f"{name}: --config {config} is not in the repo"
    for flag in flags:
        assert flag in help_texts[script], f"{name}: {script} does not accept {flag}"
    cfg = load_config(ROOT / config, overrides)
    # The job runs in the image's project folder, where the relative paths above resolve.
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == workdir()
    assert spec["rayClusterSpec"]["rayVersion"] == pinned_ray_version()
    # The models volume is mounted where the config looks for the model, on every Ray container.
    for container in containers(rayjob):
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        assert any(cfg.model.path.startswith(m.rstrip("/") + "/") for m in mounts), (
            f"{name}: {container['name']} does not mount model.path {cfg.model.path}"
        )
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert secrets, f"{name}: {container['name']} gets no S3 settings from a secret"


def test_rayjobs_run_gpu_workers_from_one_image_and_one_cluster_spec():
    audit, rescore = rayjobs().values()
    assert audit["spec"]["rayClusterSpec"] == rescore["spec"]["rayClusterSpec"], (
        "docker/rescore-cronjob.yaml's RayJob template must use the cluster of docker/rayjob.yaml"
    )
    images = {c["image"] for c in containers(audit)}
    assert len(images) == 1, f"head and workers run different images: {images}"
    for group in audit["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def _bytes(quantity: str) -> int:
    units = {"Gi": 2**30, "Mi": 2**20}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


@pytest.mark.parametrize("name", ["rayjob.yaml", "rescore-cronjob.yaml"])
def test_every_ray_pod_sizes_its_object_store_to_its_shared_memory_and_the_head_waits_for_a_clean_stop(name):
    """A pod's own /dev/shm is 64 MB: each Ray container mounts a memory-backed one and caps Ray's
    object store below it; the head gives `ray job stop` time for the driver's last part and lease."""
    spec = rayjobs()[name]["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        shm = {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]
        assert shm["medium"] == "Memory"
        (container,) = pod["containers"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert 0 < int(group["rayStartParams"]["object-store-memory"]) < _bytes(shm["sizeLimit"])
    head_env = {e["name"]: e["value"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert int(head_env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30


def test_image_pins_the_floating_libraries_and_expandable_cuda_segments():
    text = DOCKERFILE.read_text()
    assert "ENV PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in text
    assert "pip install --no-cache-dir -c constraints.txt ." in text
    pins = dict(line.split("==") for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines() if "==" in line)
    import transformers

    assert pins["transformers"] == transformers.__version__  # the version this suite runs with


def test_cronjob_creates_the_rayjob_template_it_mounts():
    docs = {d["kind"]: d for d in yaml_docs(CRONJOB)}
    cron = docs["CronJob"]
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]} in docs["Role"]["rules"]
    (container,) = pod["containers"]
    args = container["args"]
    template_path = args[args.index("-f") + 1]
    (volume,) = [v for v in pod["volumes"] if v["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert template_path.rsplit("/", 1) == [mount["mountPath"], *docs["ConfigMap"]["data"]]
    assert args[0] == "create", "a template with generateName needs `kubectl create`"
    assert rayjobs()["rescore-cronjob.yaml"]["metadata"]["generateName"]


# ---------------------------------------------------------------- README


def readme_code_lines() -> list[str]:
    """Command lines of the README's indented code blocks (continuations joined)."""
    lines, joined = [], ""
    for line in README.read_text().splitlines():
        if not line.startswith("    "):
            continue
        joined += line.strip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        lines.append(joined)
        joined = ""
    return lines


def readme_commands(program: str) -> list[list[str]]:
    """Command lines of `program` in README code blocks, as argument lists after the program."""
    found = []
    for line in readme_code_lines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if word == program or word.endswith("/" + program):
                found.append(words[i + 1 :])
                break
    return found


def is_placeholder(args: list[str]) -> bool:
    return any(a.startswith(("[", "<")) or a.endswith("]") or a in ("FILE", "...") or "|" in a for a in args)


def test_readme_keeps_the_two_command_intro():
    head = README.read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


def test_readme_cxrmem_commands_name_real_stages_flags_and_keys(help_texts):
    commands = readme_commands("cxrmem")
    assert len(commands) >= 5, "the README shows hardly any cxrmem commands"
    for args in commands:
        stage = args[0]
        if is_placeholder([stage]):
            continue  # the synopsis `cxrmem <stage> ...`
        if stage in TOOL_COMMANDS:
            assert args[1] in TOOL_COMMANDS[stage]
            name = f"cxrmem {stage} {args[1]}"
        else:
            assert stage in BY_COMMAND, f"README shows `cxrmem {stage}`, not a stage of cxrmem/cli.py"
            name = f"cxrmem {stage}"
        if is_placeholder(args):
            continue
        config, overrides, flags = entrypoint_parts(args[1:])
        for flag in flags:
            assert flag in help_texts[name], f"README: `{name}` does not accept {flag}"
        load_config(ROOT / config if config else None, overrides)


def test_readme_stage_table_lists_exactly_the_cli_commands_in_order():
    """The README's "Stages and the command line" table is the stage table's rows and the CLI's commands
    (cxrmem/stages/table.py, cxrmem/cli.py COMMANDS): a stage added to the table and not to the README fails here."""
    rows = re.findall(r"^\| `([a-z-]+)` \|", README.read_text().split("## Stages and the command line")[1].split("\n## ")[0], re.M)
    assert rows == list(BY_COMMAND)


def test_readme_inline_cxrmem_commands_name_real_stages():
    top_help = subprocess.run([sys.executable, "-m", "cxrmem.cli", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    for span in re.findall(r"`cxrmem ([a-z-]+)", README.read_text()):
        if span.startswith("--"):
            assert span in top_help, f"README mentions `cxrmem {span}`, which `cxrmem --help` does not list"
            continue
        assert span in BY_COMMAND or span in TOOL_COMMANDS, f"README mentions `cxrmem {span}`"


def test_readme_ray_job_commands_exist_and_accept_their_arguments(help_texts):
    commands = readme_commands("python")
    scripts = [args for args in commands if args and args[0].startswith("ray_jobs/")]
    assert {"ray_jobs/audit.py", "ray_jobs/rescore.py"} <= {args[0] for args in scripts}
    for args in scripts:
        assert (ROOT / args[0]).is_file(), f"README names {args[0]}, which does not exist"
        config, overrides, flags = entrypoint_parts(args[1:])
        for flag in flags if args[0] in help_texts else []:
            assert flag in help_texts[args[0]], f"README: {args[0]} does not accept {flag}"
        if not is_placeholder(args):
            load_config(ROOT / config, overrides)


def test_readme_make_targets_and_files_exist():
    makefile = (ROOT / "Makefile").read_text()
    for args in readme_commands("make"):
        assert re.search(rf"^{re.escape(args[0])}:", makefile, re.M), f"README runs `make {args[0]}`: no such target"
    for args in readme_commands("kubectl"):
        if args[0] in ("apply", "create") and "-f" in args:
            assert (ROOT / args[args.index("-f") + 1]).is_file()
    for path in set(re.findall(r"`((?:conf|docker|bench|ray_jobs)/[\w./-]+\.(?:yaml|py|md)|docker/Dockerfile)`", README.read_text())):
        if path != "bench/RESULTS.md":  # written by `cxrmem testbed evaluate`
            assert (ROOT / path).is_file(), f"README names {path}, which does not exist"


def test_readme_config_keys_exist():
    schema = OmegaConf.to_container(default_config())
    sections = set(schema)
    keys = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)(?:=[^`]*)?`", README.read_text()))
    checked = 0
    for key in keys:
        parts = key.split(".")
        if parts[0] not in sections or parts[-1] in FILE_SUFFIXES:
            continue
        node = schema
        for part in parts:
            assert isinstance(node, dict) and part in node, f"README mentions config key {key}, which does not exist"
            node = node[part]
        checked += 1
    assert checked >= 10, "the README's config keys were not found"
