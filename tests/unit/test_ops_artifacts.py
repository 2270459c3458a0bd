"""Deployment and monitoring artifacts: they parse, agree with each other, hold no secret, and
pass the tools' own checks (nats-server -t, promtool, amtool) where those tools are installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from emrdr.natsserver import nats_server_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
K8S = ROOT / "k8s"
MONITORING = ROOT / "monitoring"

SERVICES = {
    "scheduler": 9101,
    "backup-worker": 9102,
    "verifier": 9103,
    "replication-monitor": 9104,
    "dr-coordinator": 9105,
    "audit-logger": 9106,
}
CONTRACT_METRICS = (
    "emrdr_backup_consecutive_failures",
    "emrdr_replication_lag_seconds",
    "emrdr_storage_used_ratio",
    "emrdr_corruption_detected_total",
    "emrdr_archive_lag_seconds",
    "emrdr_service_up",
    "emrdr_verification_failures_total",
    "emrdr_restore_drill_seconds",
)
SEED_DASHBOARDS = {"Backup Overview", "Replication Status", "Medical Compliance",
                   "Disaster Recovery"}


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)


class TestYaml:
    @pytest.mark.parametrize(
        "path",
        sorted(
            p.relative_to(ROOT).as_posix()
            for d in (COMPOSE, K8S, MONITORING)
            for p in d.rglob("*")
            if p.suffix in {".yml", ".yaml"}
        ),
    )
    def test_every_yaml_file_parses(self, path: str) -> None:
        """Docker and kubectl are not run here: a YAML parse is the floor every file passes."""
        assert load_yaml_docs(ROOT / path), f"{path} is empty"

    def test_dashboards_are_json_with_the_seed_titles(self) -> None:
        titles = set()
        for path in (MONITORING / "grafana" / "dashboards").glob("*.json"):
            board = json.loads(path.read_text())
            assert board["uid"] and board["panels"], path.name
            for panel in board["panels"]:
                assert panel["targets"][0]["expr"], f"{path.name}: {panel['title']} has no query"
            titles.add(board["title"])
        assert titles == SEED_DASHBOARDS


class TestCompose:
    def test_stack_has_every_part(self) -> None:
        services = compose()["services"]
        assert {"nats-1", "nats-2", "nats-3", "pg-primary", "pg-replica-1",
                "prometheus", "alertmanager", "grafana"} <= set(services)
        assert services["pg-primary"]["image"].endswith(":15")

    @pytest.mark.parametrize(("name", "port"), sorted(SERVICES.items()))
    def test_each_service_runs_as_its_own_nats_user(self, name: str, port: int) -> None:
        svc = compose()["services"][name]
        env = svc["environment"]
        assert svc["command"] == ["service", name]
        assert env["EMRDR_NATS__USER"] == name
        pw_var = "NATS_" + name.upper().replace("-", "_") + "_PASSWORD"
        assert env["EMRDR_NATS__PASSWORD"].startswith("${" + pw_var + ":?")
        assert env["EMRDR_SERVICE__METRICS_PORT"] == str(port)
        assert env["EMRDR_SERVICE__METRICS_HOST"] == "0.0.0.0"

    def test_nats_nodes_get_every_password_the_auth_file_needs(self) -> None:
        needed = set(re.findall(r"\$(NATS_[A-Z_]+_PASSWORD)", (COMPOSE / "nats-auth.conf")
                                .read_text()))
        for node in ("nats-1", "nats-2", "nats-3"):
            env = compose()["services"][node]["environment"]
            assert needed <= set(env), f"{node} lacks {sorted(needed - set(env))}"
            assert env["NATS_SERVER_NAME"] == node

    def test_no_secret_is_written_in_the_repository(self) -> None:
        """Every password-like value in compose is a required ${VAR:?} interpolation and every
        password in the NATS config an environment reference."""
        text = (COMPOSE / "docker-compose.yml").read_text()
        for key, value in re.findall(
            r"^\s*([A-Z_]*(?:PASSWORD|PASSPHRASE|SECRET)[A-Z_]*):\s*(.+)$", text, re.MULTILINE
        ):
            assert value.strip().startswith("${") and ":?" in value, f"{key}: {value}"
        auth = (COMPOSE / "nats-auth.conf").read_text()
        passwords = re.findall(r"password:\s*([^,}\s]+)", auth)
        assert passwords and all(p.startswith("$NATS_") for p in passwords), passwords
        example = (COMPOSE / "env.example").read_text()
        assert all(line.endswith("=") for line in example.splitlines()
                   if "PASSWORD" in line or "PASSPHRASE" in line)
        assert ".env" in (COMPOSE / ".gitignore").read_text().split()


class TestNatsConfig:
    def test_production_choices_are_present(self) -> None:
        conf = (COMPOSE / "nats-server.conf").read_text()
        assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.MULTILINE)
        for node in ("nats-1", "nats-2", "nats-3"):
            assert f"nats-route://{node}:6222" in conf
        assert re.search(r"^\s*verify:\s*true", conf, re.MULTILINE)
        assert 'include "nats-auth.conf"' in conf

    def test_audit_guard_is_in_every_non_admin_permission(self) -> None:
        auth = (COMPOSE / "nats-auth.conf").read_text()
        for op in ("DELETE", "UPDATE", "PURGE", "MSG.DELETE"):
            assert f'"$JS.API.STREAM.{op}.AUDIT"' in auth
        blocks = re.findall(r"^([A-Z_]+) = \{(.*?)^\}", auth, re.MULTILINE | re.DOTALL)
        perms = {name: body for name, body in blocks if "publish" in body}
        assert len(perms) >= 10
        for name, body in perms.items():
            if name == "ADMIN":
                assert '"emrdr.audit.>"' in body  # admin is denied writing audit entries
                continue
            assert "deny = $ADMIN_ONLY_JS_API" in body, f"{name} lacks the admin-only deny list"
            assert ("emrdr.audit.>" in body.split("deny")[0]) == (name == "AUDIT_LOGGER"), name

    def test_server_accepts_the_production_config(self, tmp_path: Path) -> None:
        """`nats-server -t` on the shipped files, certificates generated, passwords set."""
        if shutil.which("openssl") is None:
            pytest.skip("openssl not installed: cannot make the route certificates")
        certs = tmp_path / "certs"
        shutil.copytree(COMPOSE, tmp_path / "compose", ignore=shutil.ignore_patterns("certs"))
        script = tmp_path / "compose" / "make-dev-certs.sh"
        made = run_tool("sh", str(script))
        assert made.returncode == 0, made.stderr
        shutil.move(tmp_path / "compose" / "certs", certs)
        conf = tmp_path / "compose" / "nats-server.conf"
        conf.write_text(conf.read_text().replace("/etc/nats/certs", str(certs)))
        env = dict(os.environ, NATS_SERVER_NAME="nats-1")
        for var in set(re.findall(r"\$(NATS_[A-Z_]+_PASSWORD)",
                                  (COMPOSE / "nats-auth.conf").read_text())):
            env[var] = os.urandom(16).hex()
        checked = run_tool(str(nats_server_binary()), "-c", str(conf), "-t", env=env)
        assert checked.returncode == 0, checked.stderr + checked.stdout


class TestKubernetes:
    def test_kustomization_resources_exist(self) -> None:
        kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
        for res in kust["resources"]:
            assert (K8S / res).exists(), res
        for gen in kust["configMapGenerator"]:
            for f in gen["files"]:
                assert (K8S / f).exists(), f

    def test_nats_auth_copy_is_identical(self) -> None:
        """kustomize may not read outside k8s/, so the permissions are copied: never edited."""
        assert (K8S / "nats-auth.conf").read_bytes() == (COMPOSE / "nats-auth.conf").read_bytes()

    def test_one_deployment_per_service_probed_on_its_metrics_port(self) -> None:
        docs = load_yaml_docs(K8S / "services.yaml")
        deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
        assert set(deployments) == set(SERVICES)
        for name, port in SERVICES.items():
            container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
            assert container["args"] == ["service", name]
            env = {e["name"]: e for e in container["env"]}
            assert env["EMRDR_NATS__USER"]["value"] == name
            assert env["EMRDR_SERVICE__METRICS_PORT"]["value"] == str(port)
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["metrics"] == port
            assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
            assert "value" not in env["EMRDR_NATS__PASSWORD"]  # from the Secret

    def test_secret_template_holds_no_secret(self) -> None:
        for doc in load_yaml_docs(K8S / "secret.template.yaml"):
            assert doc["kind"] == "Secret"
            assert all(v == "" for v in doc["stringData"].values())
        kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
        assert "secret.template.yaml" not in kust["resources"]

    def test_nats_values_run_r3_with_sync_always(self) -> None:
        values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
        assert values["config"]["cluster"]["replicas"] == 3
        assert values["config"]["jetstream"]["merge"]["sync_interval"] == "always"


class TestMonitoring:
    def test_prometheus_scrapes_the_six_services(self) -> None:
        prom = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        job = next(j for j in prom["scrape_configs"] if j["job_name"] == "emrdr")
        targets = {t for sc in job["static_configs"] for t in sc["targets"]}
        assert targets == {f"{name}:{port}" for name, port in SERVICES.items()}

    def test_rules_and_readme_cover_the_metric_contract(self) -> None:
        rules = (MONITORING / "alerts.yml").read_text()
        readme = (MONITORING / "README.md").read_text()
        for metric in CONTRACT_METRICS:
            assert metric in rules, f"no rule uses {metric}"
            assert f"`{metric}`" in readme, f"README does not list {metric}"

    def test_alertmanager_sends_failover_alerts_to_the_coordinator(self) -> None:
        am = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
        receivers = {r["name"]: r for r in am["receivers"]}
        hook = receivers["dr-coordinator"]["webhook_configs"][0]
        assert hook["url"] == "http://dr-coordinator:9094/alertmanager"
        route = next(r for r in am["route"]["routes"] if r["receiver"] == "dr-coordinator")
        assert route["continue"] is True
        rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
        primary_down = [r for g in rules["groups"] for r in g["rules"]
                        if r["alert"] == "EmrdrPrimaryDown"]
        assert primary_down and primary_down[0]["labels"]["dr_action"]

    def test_promtool_checks_and_unit_tests_pass(self) -> None:
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool not installed (Debian package: prometheus)")
        for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml"),
                     ("test", "rules", "alerts_test.yml")):
            res = subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True,
                                 text=True, timeout=60, check=False)
            assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}{res.stderr}"

    def test_amtool_accepts_the_alertmanager_config(self) -> None:
        amtool = shutil.which("amtool")
        if amtool is None:
            pytest.skip("amtool not installed (Debian package: prometheus-alertmanager)")
        res = run_tool(amtool, "check-config", str(MONITORING / "alertmanager.yml"))
        assert res.returncode == 0, res.stdout + res.stderr
        routed = run_tool(amtool, "config", "routes", "test",
                          f"--config.file={MONITORING / 'alertmanager.yml'}",
                          "severity=emergency", "dr_action=failover", "alertname=EmrdrPrimaryDown")
        assert routed.stdout.split()[0].split(",") == ["dr-coordinator", "email-emergency"]
