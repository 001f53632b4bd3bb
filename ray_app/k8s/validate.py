"""Check a KubeRay manifest before it reaches a cluster: `validate_manifest(doc) -> list[str]`.

Three layers, because the API server accepts many manifests that KubeRay later refuses:

1. The CRD schema (KubeRay v1.7.0), as JSON Schema. Differences from the API server are made up
   for here: unknown fields are errors (as with `kubectl apply`'s strict field validation),
   `x-kubernetes-list-map-keys` uniqueness and the CRDs' CEL rules are checked, and int32
   ranges are enforced. Defaults are *not* applied, so write `minReplicas`/`maxReplicas`.
2. KubeRay's controller rules (`ValidateRayClusterSpec`/`ValidateRayJobSpec`) that the schema
   cannot express, in rules.py, each citing its line in KubeRay. A RayJob breaking one is
   accepted by `kubectl apply` and only fails later with `ValidationFailed`.
3. This project's rules for fine-tuning clusters (rules.py): resources on every container, pods
   that cannot reach into their node (no hostPath, host namespaces, privileged containers,
   privilege escalation or added capabilities), secrets only via `secretKeyRef`, shared storage
   on every pod, a drain hook on GPU workers, the dashboard reachable only inside the cluster.
   Pass `project_rules=False` to skip them.

Example:
    errors = validate_manifest(yaml.safe_load(open("jobs/rayjobs/train.yaml")))
    if errors:
        print("\n".join(errors))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from typing import Any

import jsonschema

from ray_app.k8s import schemas
from ray_app.k8s.rules import KUBERAY_RULES, PROJECT_RULES

# --------------------------------------------------------------------------- entry point


def validate_manifest(doc: Any, *, project_rules: bool = True) -> list[str]:
    """Human-readable problems with one Kubernetes manifest; an empty list means it is fine.

    RayCluster, RayJob and RayService (ray.io/v1) get all three layers; other kinds get a
    structural check (and, for Secrets, the no-committed-secrets rule).
    """
    if not isinstance(doc, dict):
        return [f"a manifest must be a YAML mapping, got {type(doc).__name__}"]
    kind = doc.get("kind")
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = metadata.get("name")
    label = f"{kind or 'manifest'} {name or '<unnamed>'}"
    api_version = doc.get("apiVersion")
    if not kind or not api_version:
        return [f"{label}: apiVersion and kind are required"]

    group, _, version = str(api_version).rpartition("/")
    if group != schemas.GROUP:
        errors = list(_builtin_checks(doc, project_rules))
    elif kind not in schemas.KINDS:
        errors = [
            f"kind {kind} is not checked here; known ray.io kinds: {', '.join(schemas.KINDS)}"
        ]
    elif version != "v1":
        errors = [f"apiVersion {api_version} is deprecated or unknown; use ray.io/v1"]
    else:
        errors = list(_schema_errors(doc, kind))
        rules = KUBERAY_RULES + (PROJECT_RULES if project_rules else ())
        for rule in rules:
            errors.extend(_run_rule(rule, doc))
    return [f"{label}: {e}" for e in errors]


def _run_rule(rule: Callable[[dict], Iterable[str]], doc: dict) -> list[str]:
    # A rule may meet a malformed shape (a list where a mapping belongs, ...). The schema layer
    # already reports those precisely, so the rule's own crash would add only noise.
    try:
        return list(rule(doc))
    except (AttributeError, TypeError, KeyError, ValueError):
        return []


# --------------------------------------------------------------------------- schema layer


def _cel_managed_by(value: Any) -> bool:
    return value in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")


# The CEL rules found in the v1.7.0 CRDs, as Python. Transition rules (self == oldSelf) compare
# with the stored object and cannot fail on a new manifest. A test keeps this table complete.
CEL_RULES: dict[str, Callable[[Any], bool] | None] = {
    "self == oldSelf": None,
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']": _cel_managed_by,
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))": lambda v: (
        not (("onSuccess" in v or "onFailure" in v) and "deletionRules" in v)
    ),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))": lambda v: (
        ("onSuccess" in v and "onFailure" in v) or "deletionRules" in v
    ),
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))": lambda v: (
        not ("jobStatus" in v and "jobDeploymentStatus" in v)
    ),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)": lambda v: (
        "jobStatus" in v or "jobDeploymentStatus" in v
    ),
}


def _cel_keyword(validator, rules, instance, schema):
    for rule in rules:
        check = CEL_RULES.get(rule["rule"])
        if check is not None and not check(instance):
            yield jsonschema.ValidationError(rule.get("message") or f"violates {rule['rule']}")


def _list_map_keys_keyword(validator, keys, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
        if key in seen:
            shown = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
            yield jsonschema.ValidationError(
                f"items [{seen[key]}] and [{index}] share {shown}; entries must be unique by "
                f"{'/'.join(keys)}"
            )
        seen.setdefault(key, index)


_K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {
        "x-kubernetes-validations": _cel_keyword,
        "x-kubernetes-list-map-keys": _list_map_keys_keyword,
    },
)

_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
_FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)


def _structural(node: Any) -> Any:
    """Adapt a CRD schema to what the API server enforces (see the module docstring)."""
    if isinstance(node, dict):
        node = {k: _structural(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return node
    if isinstance(node, list):
        return [_structural(v) for v in node]
    return node


@cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    schema = _structural(schemas.openapi_schema(kind, "v1"))
    return _K8sValidator(schema, format_checker=_FORMATS)


def _schema_errors(doc: dict, kind: str) -> Iterator[str]:
    errors = sorted(_validator(kind).iter_errors(doc), key=lambda e: _path(e.absolute_path))
    for err in errors:
        yield f"{_path(err.absolute_path) or '<root>'}: {_describe(err)}"


def _describe(err: jsonschema.ValidationError) -> str:
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        names = ", ".join(repr(e) for e in extra)
        return f"unknown field(s) {names}; check the spelling against KubeRay v1.7 (ray.io/v1)"
    if err.validator == "required":
        return f"missing required field {err.message.split(' is a required')[0]}"
    if err.validator == "type" and err.validator_value == "string" and _is_scalar(err.instance):
        quoted = json.dumps(_yaml_scalar(err.instance))
        return f"must be a string; quote the value in YAML: {quoted}"
    if err.validator == "anyOf" and err.schema.get("x-kubernetes-int-or-string"):
        return f'{err.instance!r} must be an integer or a quantity string such as "500m" or "4Gi"'
    if err.validator == "enum":
        return f"{err.instance!r} is not one of {', '.join(map(str, err.validator_value))}"
    return err.message


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float))


def _yaml_scalar(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- other kinds


def _builtin_checks(doc: dict, project_rules: bool) -> Iterator[str]:
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        yield "metadata.name is required"
    if project_rules and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        yield (
            "a Secret with data belongs in the cluster, not in a file; create it with "
            "`kubectl create secret generic ...` (see docs/kuberay.md)"
        )
