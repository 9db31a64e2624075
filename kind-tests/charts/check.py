#!/usr/bin/env python3
"""The charts, checked by real tools (run by kind-tests/run-tests.sh, in the venv that
kind-tests/chart-tools.sh makes):

1. Helm: both charts linted (strict) and rendered with Helm 4's own Go library
   (`helm-python-sdk`, offline: no cluster) for every value set in values/<chart>/*.yaml;
   the value sets in values/<chart>/bad/*.yaml must fail to render with an error naming
   the value (their first line is `# expect: <text the error must contain>`).
2. Schemas: every rendered object validated strictly against Kubernetes 1.29 and 1.37
   (`kubernetes-validate`); every custom resource of ours (the charts' LoadBalancingPolicy,
   the kind harness's MCS objects) against its CRD's openAPIV3Schema (jsonschema).
   Custom resources of other projects (ServiceMonitor, cert-manager Certificate) are checked
   for apiVersion/kind/metadata only: their CRDs are not here.
3. Security scan: checkov (kubernetes framework, --skip-download) on the rendered manifests;
   a finding fails unless the template skips it by annotation with a reason.

Exit status 0 only when everything passes; every failure is printed with its file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python
from helm_python import _native
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CHARTS = {"ballast-broker": ROOT / "helm/ballast-broker", "ballast-agent": ROOT / "helm/ballast-agent"}
KUBE_VERSIONS = ["1.29", "1.37"]
NAMESPACE = "ballast-system"
FOREIGN_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("cert-manager.io/v1", "Certificate")}

failures: list[str] = []


def fail(where: str, msg: str) -> None:
    failures.append(f"{where}: {msg}")
    print(f"FAIL {where}: {msg}", file=sys.stderr)


def objects_of(text: str):
    for doc in yaml.safe_load_all(text):
        if doc:
            yield doc


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD this repository ships."""
    out = {}
    files = list((ROOT / "helm/ballast-broker/crds").glob("*.yaml"))
    files += list((ROOT / "kind-tests/kind/mcs-crds").glob("*.yaml"))
    for f in files:
        for crd in objects_of(f.read_text()):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


def as_json_schema(s):
    """openAPIV3Schema -> JSON schema: drop the x-kubernetes-* extensions; objects without
    declared properties stay open, those with properties are closed (the API server prunes
    unknown fields, so an unknown field is a mistake of ours)."""
    if isinstance(s, list):
        return [as_json_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {k: as_json_schema(v) for k, v in s.items() if not k.startswith("x-kubernetes-")}
    if s.get("x-kubernetes-int-or-string"):
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        if not s.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if out.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    return out


def validate_object(where: str, obj: dict, schemas: dict, versions=KUBE_VERSIONS) -> None:
    api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    name = obj.get("metadata", {}).get("name", "?")
    at = f"{where} {kind}/{name}"
    if (api, kind) in schemas:
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        schema = as_json_schema(schemas[(api, kind)])
        for key in ("apiVersion", "kind", "metadata"):
            schema.get("properties", {}).pop(key, None)
        try:
            jsonschema.validate(body, schema)
        except jsonschema.ValidationError as e:
            fail(at, f"against its CRD: {e.message} at {'/'.join(map(str, e.absolute_path))}")
        return
    if (api, kind) in FOREIGN_KINDS:
        if not obj.get("metadata", {}).get("name"):
            fail(at, "metadata.name missing")
        return
    for v in versions:
        try:
            kubernetes_validate.validate(obj, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(at, f"Kubernetes {v}: {e.message} at {'/'.join(map(str, e.path))}")
        except kubernetes_validate.SchemaNotFoundError:
            fail(at, f"Kubernetes {v}: no schema for {api} {kind}")


def render(chart: str, values: dict, kube_version: str = KUBE_VERSIONS[-1]) -> dict[str, str]:
    """`helm template` for Kubernetes `kube_version` (.Capabilities.KubeVersion). The SDK's
    Chart.render does not expose the version, its native call does (option kube_version)."""
    c = helm_python.Chart.load(CHARTS[chart])
    try:
        opts = {"name": chart, "namespace": NAMESPACE, "is_install": True,
                "kube_version": f"{kube_version}.0"}
        return json.loads(_native.call_string("helm_render", c._raw(), json.dumps(values),
                                              json.dumps(opts)))
    finally:
        c.close()


def lint(chart: str, values: dict, where: str) -> None:
    for v in KUBE_VERSIONS:
        r = helm_python.lint(CHARTS[chart], values, strict=True, namespace=NAMESPACE,
                             kube_version=f"{v}.0")
        # helm severities: 1 info, 2 warning, 3 error
        msgs = [m for m in r.get("messages", []) if int(m.get("severity", 0)) >= 2]
        if r.get("errors") or msgs:
            fail(where, f"helm lint (Kubernetes {v}): {json.dumps(r.get('errors') or msgs)}")


def checkov(where: str, out_dir: Path) -> None:
    exe = Path(sys.executable).with_name("checkov")
    proc = subprocess.run(
        [str(exe), "-d", str(out_dir), "--framework", "kubernetes", "--skip-download",
         "--quiet", "--compact", "-o", "json"],
        capture_output=True, text=True,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_NO_UPDATE": "1"},
    )
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        fail(where, f"checkov printed no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return
    reports = report if isinstance(report, list) else [report]
    for r in reports:
        for f in r.get("results", {}).get("failed_checks", []):
            fail(where, f"checkov {f['check_id']} ({f['check_name']}) on {f.get('resource')}")


def main() -> int:
    schemas = crd_schemas()
    with tempfile.TemporaryDirectory() as tmp:
        for chart in CHARTS:
            sets = sorted((HERE / "values" / chart).glob("*.yaml"))
            if len(sets) < 4:
                fail(chart, f"{len(sets)} value sets; want at least 4")
            for vs in sets:
                where = f"{chart} {vs.name}"
                values = yaml.safe_load(vs.read_text()) or {}
                lint(chart, values, where)
                for kv in KUBE_VERSIONS:
                    try:
                        rendered = render(chart, values, kv)
                    except helm_python.HelmError as e:
                        fail(f"{where} (Kubernetes {kv})", f"render: {e}")
                        continue
                    out = Path(tmp) / chart / vs.stem / kv
                    out.mkdir(parents=True)
                    count = 0
                    for path, text in sorted(rendered.items()):
                        if not path.endswith((".yaml", ".yml")) or not text.strip():
                            continue
                        for obj in objects_of(text):
                            validate_object(f"{where} {path}", obj, schemas, [kv])
                            count += 1
                        (out / path.replace("/", "_")).write_text(text)
                    print(f"ok   {where}: {count} objects rendered for and validated against "
                          f"Kubernetes {kv}", file=sys.stderr)
                # the scan on the newest render
                checkov(where, out)
            for bad in sorted((HERE / "values" / chart / "bad").glob("*.yaml")):
                where = f"{chart} bad/{bad.name}"
                text = bad.read_text()
                expect = text.splitlines()[0].removeprefix("# expect:").strip()
                try:
                    render(chart, yaml.safe_load(text) or {})
                    fail(where, "rendered; it must fail")
                except helm_python.HelmError as e:
                    if expect not in str(e):
                        fail(where, f"failed without naming {expect!r}: {e}")
                    else:
                        print(f"ok   {where}: refused ({expect})", file=sys.stderr)
        # The kind harness's own MCS objects against the MCS CRDs.
        # (with the placeholders test.sh substitutes)
        for f in sorted((ROOT / "kind-tests/kind/manifests").glob("*.yaml")):
            text = f.read_text().replace("ECHO_NODE_PORT", "30080").replace("CLUSTER_ID", "c1")
            for obj in objects_of(text):
                validate_object(f"kind-tests/kind/manifests/{f.name}", obj, schemas)
    if failures:
        print(f"\n{len(failures)} chart check(s) failed", file=sys.stderr)
        return 1
    print("charts: every check passed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
