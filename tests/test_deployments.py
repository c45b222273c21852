"""prefect.yaml: every deployment's entrypoint and parameters validate, and the schedule's cron parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.flows import load_flow_from_entrypoint

from flows.deployments import DATASET_EVENT, deployment_specs
from pipeline_config.loading import load_pipeline_config
from tasks.evaluate import SUITE_CHANGED_EVENT
from tasks.registry import CHAMPION_PROMOTED_EVENT, champion_promoted_events

REPO = Path(__file__).resolve().parent.parent
SPECS = deployment_specs()


def test_the_nine_deployments_exist():
    names = {s["name"] for s in SPECS}
    assert names == {
        "qlora-align",
        "merge-champion",
        "rescore-champion",
        "qlora-sweep",
        "qlora-default",
        "qlora-nightly",
        "qlora-on-dataset-update",
        "llama2-7b-chat-guanaco-gpu",
        "llama2-7b-chat-guanaco-k8s",
    }


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["name"])
def test_entrypoint_and_parameters_validate(spec):
    flow = load_flow_from_entrypoint(str(REPO / spec["entrypoint"]))
    params = flow.validate_parameters(spec["parameters"])
    if spec["entrypoint"] == "flows/merge.py:merge":
        assert params["model"].startswith("models:/") and params["dtype"] in ("bf16", "fp16", "fp32")
        return
    cfg = load_pipeline_config(REPO / params["config_path"], params["overrides"])
    if spec["entrypoint"] == "flows/evaluate.py:evaluate":
        assert params["model"].startswith("models:/") and cfg.evaluation.suites  # something to score it on
    if spec["entrypoint"] == "flows/sweep.py:sweep":
        from pipeline_config.sweep import load_sweep_space

        assert load_sweep_space(REPO / params["space_path"], cfg).n_trials >= 2
        flow_name, name = params["trial_deployment"].split("/")  # the finetune deployment the trials run through
        trials = next(s for s in SPECS if s["name"] == name)
        assert load_flow_from_entrypoint(str(REPO / trials["entrypoint"])).name == flow_name == "qlora-finetune"
        assert trials["work_pool"] == spec["work_pool"]
    assert cfg.model.name_or_path
    for schedule in spec.get("schedules", []):
        cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        assert cron.timezone == "Europe/Berlin"
    for trigger in spec.get("triggers", []):
        parsed = DeploymentEventTrigger(**{k: v for k, v in trigger.items() if k != "type"})
        expected = {
            DATASET_EVENT: {"data_source", "config_path"},
            SUITE_CHANGED_EVENT: {"model", "config_path"},
            CHAMPION_PROMOTED_EVENT: {"config_path", "adapter"},
        }
        (event,) = parsed.expect
        assert set(parsed.parameters) == expected[event]


def test_a_changed_suite_event_matches_the_rescore_trigger_and_fills_its_parameters():
    """The event a fine-tune run emits when the champion has no scores of a suite's current version
    (tasks/evaluate.py) matches the rescore-champion deployment's trigger, and every parameter the trigger templates
    reads a field the event has."""
    import re
    from types import SimpleNamespace

    from prefect.events.schemas.events import Resource

    from pipeline_config.evaluation import SuiteConfig
    from pipeline_config.loading import load_pipeline_config
    from tasks.evaluate import suite_changed_event

    cfg = load_pipeline_config(REPO / "pipeline_config/default.yaml", [])
    run = {"results": {"qlora_general_text": {}}, "versions": {"qlora_general_text": 1}, "lm_eval_version": "0.4"}
    stale = SimpleNamespace(
        suite=SuiteConfig(name="offline", tasks=["qlora_general_text"]), finetuned=run, data_digests={},
        champion_version="3", champion_scores=None,
    )  # fmt: skip
    event = suite_changed_event(cfg, [stale], "pipeline_config/default.yaml")
    assert event["payload"]["champion_version"] == "3" and set(event["payload"]["suite_versions"]) == {"offline"}
    spec = next(s for s in SPECS if s["name"] == "rescore-champion")
    (trigger,) = spec["triggers"]
    parsed = DeploymentEventTrigger(**{k: v for k, v in trigger.items() if k != "type"})
    assert event["event"] in parsed.expect and parsed.match.includes([Resource(event["resource"])])
    for template in parsed.parameters.values():
        (field,) = re.fullmatch(r"\{\{ event\.resource\['([^']+)'\] \}\}", template).groups()
        assert event["resource"][field]
    assert event["resource"]["qlora.model_uri"] == "models:/smollm2-135m-orders@champion"
    # scores of the current version (or none to compare with): no event
    assert suite_changed_event(cfg, [SimpleNamespace(**{**vars(stale), "champion_scores": {}})], "x.yaml") is None
    assert suite_changed_event(cfg, [SimpleNamespace(**{**vars(stale), "champion_version": None})], "x.yaml") is None


def test_a_promoted_champion_starts_each_next_stage_through_the_align_trigger():
    """The events a run emits when its version becomes champion (tasks/registry.py): one per next stage of
    default.yaml, each matching the qlora-align trigger, whose parameters then name that stage's config (a valid
    config that starts from the pinned champion version); none for a challenger; without next stages one event that
    the align trigger ignores."""
    import re

    from prefect.events.schemas.events import Resource

    from pipeline_config.loading import load_pipeline_config
    from qlora.registry import PromotionDecision

    cfg = load_pipeline_config(REPO / "pipeline_config/default.yaml", [])
    promoted = PromotionDecision("4", True, "no champion yet", 46.0, None, None)
    events = champion_promoted_events(cfg, promoted)
    assert [e["resource"]["qlora.next_stage"] for e in events] == cfg.registry.next_stages
    assert cfg.registry.next_stages == ["pipeline_config/align-dpo.yaml", "pipeline_config/align-grpo.yaml"]
    spec = next(s for s in SPECS if s["name"] == "qlora-align")
    (trigger,) = spec["triggers"]
    parsed = DeploymentEventTrigger(**{k: v for k, v in trigger.items() if k != "type"})
    for event in events:
        assert event["event"] in parsed.expect and parsed.match.includes([Resource(event["resource"])])
        params = {}
        for name, template in parsed.parameters.items():
            (field,) = re.fullmatch(r"\{\{ event\.resource\['([^']+)'\] \}\}", template).groups()
            params[name] = event["resource"][field]
        assert params["adapter"] == "models:/smollm2-135m-orders/4"
        stage = load_pipeline_config(REPO / params["config_path"], [f"model.adapter={params['adapter']}"])
        assert stage.training.method in ("dpo", "grpo") and stage.model.name_or_path == cfg.model.name_or_path
    assert champion_promoted_events(cfg, PromotionDecision("5", False, "does not beat", 40.0, 46.0, "4")) == []
    cfg.registry.next_stages = []
    (plain,) = champion_promoted_events(cfg, promoted)
    assert not parsed.match.includes([Resource(plain["resource"])])


def test_gpu_deployment_uses_its_own_queue():
    gpu = next(s for s in SPECS if s["name"] == "llama2-7b-chat-guanaco-gpu")
    assert gpu["work_pool"]["work_queue_name"] == "gpu"
    assert all(s["work_pool"]["work_queue_name"] == "default" for s in SPECS if s is not gpu)
    assert {s["work_pool"]["name"] for s in SPECS} == {"qlora-process", "qlora-k8s"}


def test_kubernetes_job_template_requests_gpus_and_runs_the_flow(prefect_server):
    """The qlora-k8s work pool's base job template, rendered as the Kubernetes worker renders it for a flow run of
    the k8s deployment (no cluster here): the GPU request, node selector, tolerations and shared memory from the
    job variables, and the command that executes the flow run."""
    import asyncio
    import json
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((REPO / "deploy" / "kubernetes-gpu-job-template.json").read_text())
    spec = next(s for s in SPECS if s["name"] == "llama2-7b-chat-guanaco-k8s")
    assert spec["work_pool"]["name"] == "qlora-k8s" and spec["work_pool"]["job_variables"]["gpu_count"] == 1
    selector = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    values = {**spec["work_pool"]["job_variables"], "gpu_count": 4, "node_selector": selector}
    values["image"] = "registry.example/qlora-flow:1"
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="quiet-yak"))
    pod = config.job_manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert "cpu" not in container["resources"]["limits"]  # unset variables leave no empty fields
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["image"] == "registry.example/qlora-flow:1"
    assert pod["nodeSelector"] == selector
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert any(e["name"] == "PREFECT__FLOW_RUN_ID" for e in container["env"])  # the run it executes
    # The defaults alone: one GPU, no node selector.
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, {}))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="quiet-yak"))
    pod = config.job_manifest["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["containers"][0]["image"] == "qlora-flow:latest" and pod["nodeSelector"] == {}


def test_serve_builds_every_process_pool_deployment_with_its_schedule_and_trigger():
    """`qlora-flow serve` turns prefect.yaml's process-pool deployments into runner deployments (it failed on the
    schedule's form once: found by running it)."""
    from flows.deployments import runner_deployments

    built = {d.name: d for d in runner_deployments()}
    assert set(built) == {
        "qlora-align",
        "qlora-default",
        "qlora-nightly",
        "qlora-on-dataset-update",
        "merge-champion",
        "rescore-champion",
        "qlora-sweep",
    }
    (schedule,) = built["qlora-nightly"].schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    assert len(built["qlora-on-dataset-update"].triggers) == 1
    assert len(built["qlora-align"].triggers) == 1
    assert built["merge-champion"].parameters["model"] == "models:/smollm2-135m-orders@champion"
    assert "llama2-7b-chat-guanaco-gpu" in {d.name for d in runner_deployments(include_gpu=True)}


def test_the_kuberay_cluster_renders_to_a_valid_ray_cluster_with_gpu_workers_and_shared_runs():
    """deploy/kuberay-raycluster.yaml, rendered as its header says (envsubst), is a RayCluster that KubeRay's own
    schema accepts (there is no cluster here): GPU workers with /dev/shm in memory, the run folder's claim mounted
    where every node and the flow look for it, the image of the Kubernetes work pool, the token from a Secret."""
    import re
    import string

    jsonschema = pytest.importorskip("jsonschema")
    text = (REPO / "deploy" / "kuberay-raycluster.yaml").read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    variables = set(re.findall(r"\$\{(\w+)\}", text))
    assert variables == {"IMAGE", "GPU_WORKERS", "GPUS_PER_WORKER", "RUNS_CLAIM", "RAY_AUTH_TOKEN"}
    assert all(name in header for name in variables - {"RAY_AUTH_TOKEN"})
    values = {
        "IMAGE": "registry.example/qlora-flow:1",
        "GPU_WORKERS": "2",
        "GPUS_PER_WORKER": "8",
        "RUNS_CLAIM": "qlora-runs",
        "RAY_AUTH_TOKEN": "t0k3n",
    }
    secret, cluster = yaml.safe_load_all(string.Template(text).substitute(values))
    assert secret["kind"] == "Secret" and secret["stringData"]["auth_token"] == "t0k3n"
    schema = json.loads((REPO / "deploy" / "schemas" / "kuberay-raycluster-v1.json").read_text())
    jsonschema.validate(cluster, schema)
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert workers["replicas"] == 2
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"] == "/dev/shm"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    for spec in (head, pod):
        (c,) = spec["containers"]
        assert c["image"] == values["IMAGE"]
        runs = next(v for v in spec["volumes"] if v["name"] == "runs")
        assert runs["persistentVolumeClaim"]["claimName"] == "qlora-runs"
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["runs"] == "/opt/qlora-flow/outputs"
    # the image of the Kubernetes deployment's Jobs (the flow run is the Ray driver): the repository where that
    # deployment's runs work, /opt/qlora-flow
    (k8s,) = [
        d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"].endswith("-k8s")
    ]
    assert "/opt/qlora-flow" in json.dumps(k8s["pull"]) and c["workingDir"] == "/opt/qlora-flow"
    # the Ray version KubeRay starts is the one the `ray` extra pins
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"ray[train]=={cluster['spec']['rayVersion']}" in pyproject
    # a manifest KubeRay would refuse fails this check
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
