#!/usr/bin/env bash
# Static checks of the deployment files, run from the repository root:
#
#   bash deploy/check.sh
#
# Prints one line per check and exits non-zero if any check fails. Installs
# promtool (Debian's prometheus package) and PyYAML when they are missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

failures=0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

pass() { printf 'ok    %s\n' "$1"; }
skip() { printf 'skip  %s (%s)\n' "$1" "$2"; }
fail() {
    printf 'FAIL  %s\n' "$1"
    if [ -n "${2:-}" ]; then
        printf '%s\n' "$2" | sed 's/^/      /'
    fi
    failures=$((failures + 1))
}

# run NAME COMMAND...: one check, its output shown only when it fails.
run() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        pass "$name"
    else
        fail "$name" "$out"
    fi
}

# --- tools ------------------------------------------------------------------

if ! command -v promtool >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
command -v promtool >/dev/null 2>&1 || { fail "promtool installed"; exit 1; }

if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    python3 -m pip install -q pyyaml >/dev/null 2>&1 \
        || python3 -m pip install -q --break-system-packages pyyaml >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-yaml >/dev/null; } \
        || true
fi
python3 -c 'import yaml' >/dev/null 2>&1 || { fail "PyYAML installed"; exit 1; }

# --- Prometheus ---------------------------------------------------------------

run "promtool check rules deploy/prometheus/alerts.yml" \
    promtool check rules deploy/prometheus/alerts.yml
run "promtool test rules deploy/prometheus/alerts.test.yml" \
    promtool test rules deploy/prometheus/alerts.test.yml
run "promtool check config deploy/prometheus/scrape.yml" \
    promtool check config deploy/prometheus/scrape.yml

# --- JSON ---------------------------------------------------------------------

while IFS= read -r -d '' f; do
    run "json $f" python3 -m json.tool "$f"
done < <(find deploy -type f -name '*.json' -print0 | sort -z)

# --- YAML ---------------------------------------------------------------------

yaml_check() {
    python3 - "$1" <<'PY'
import sys, yaml
with open(sys.argv[1], encoding="utf-8") as f:
    docs = [d for d in yaml.safe_load_all(f) if d is not None]
if not docs:
    sys.exit("no YAML document")
for d in docs:
    if not isinstance(d, dict):
        sys.exit("a document is not a mapping")
    if "kind" not in d or "apiVersion" not in d:
        sys.exit("a document lacks kind or apiVersion")
PY
}
while IFS= read -r -d '' f; do
    run "yaml $f" yaml_check "$f"
done < <(find deploy/kubernetes -type f \( -name '*.yaml' -o -name '*.yml' \) -print0 | sort -z)

# Each relay.toml (embedded in a ConfigMap, or a file) must be valid TOML.
toml_check() {
    python3 - "$1" <<'PY'
import sys, yaml
try:
    import tomllib
except ImportError:
    sys.exit(0)  # Python < 3.11: nothing to check with
path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    text = f.read()
if path.endswith(".yaml"):
    text = yaml.safe_load(text)["data"]["relay.toml"]
cfg = tomllib.loads(text)
for key in ("server", "spool", "accounts", "targets", "routes"):
    if key not in cfg:
        sys.exit(f"relay.toml lacks [{key}]")
PY
}
for f in deploy/kubernetes/configmap.yaml deploy/kubernetes/postgres/configmap.yaml \
         deploy/compose/relay.toml; do
    run "toml $f (relay.toml)" toml_check "$f"
done

# The kustomizations build (only where kubectl is at hand).
for k in deploy/kubernetes deploy/kubernetes/postgres; do
    if command -v kubectl >/dev/null 2>&1; then
        run "kubectl kustomize $k" kubectl kustomize "$k"
    else
        skip "kubectl kustomize $k" "no kubectl"
    fi
done

# --- docker compose -------------------------------------------------------------

# Two relay replicas on the same image, configuration and database, behind
# the load balancer, started after the schema is migrated.
compose_check() {
    python3 - <<'PY'
import sys, yaml
with open("deploy/compose/docker-compose.yml", encoding="utf-8") as f:
    services = yaml.safe_load(f)["services"]
relays = [n for n, s in services.items() if "serve" in s.get("command", [])]
if len(relays) < 2:
    sys.exit(f"fewer than two relay replicas: {relays}")
for name in ("postgres", "migrate", "nginx"):
    if name not in services:
        sys.exit(f"no service {name}")
first = services[relays[0]]
for name in relays:
    s = services[name]
    for key in ("image", "volumes", "environment"):
        if s.get(key) != first.get(key):
            sys.exit(f"{name}: {key} differs from {relays[0]}'s")
    if "WXRELAY_SPOOL__URL" not in s["environment"]:
        sys.exit(f"{name}: no WXRELAY_SPOOL__URL")
    if s["depends_on"]["migrate"]["condition"] != "service_completed_successfully":
        sys.exit(f"{name}: starts before migrate completes")
with open("deploy/compose/nginx.conf", encoding="utf-8") as f:
    nginx = f.read()
for name in relays:
    if f"server {name}:8080" not in nginx:
        sys.exit(f"nginx.conf does not balance over {name}")
PY
}
run "yaml deploy/compose/docker-compose.yml" compose_check
if docker compose version >/dev/null 2>&1; then
    run "docker compose config deploy/compose/docker-compose.yml" \
        env POSTGRES_PASSWORD=x WXRELAY_TOKEN=x WXRELAY_ENCODING_AES_KEY=x \
        WXRELAY_WEBHOOKS_SECRET=x WXRELAY_ADMIN_TOKEN=x \
        docker compose -f deploy/compose/docker-compose.yml config --quiet
else
    skip "docker compose config deploy/compose/docker-compose.yml" "no docker compose"
fi

# --- shell and systemd --------------------------------------------------------

run "bash -n deploy/check.sh" bash -n deploy/check.sh

# systemd-analyze needs the binary to exist: verify a copy that runs /bin/true.
unit_check() {
    local dir rc=0
    dir=$(mktemp -d)
    sed 's#/usr/local/bin/wxrelay#/bin/true#g' deploy/systemd/wxrelay.service > "$dir/wxrelay.service"
    systemd-analyze verify "$dir/wxrelay.service" || rc=$?
    rm -rf "$dir"
    return "$rc"
}
if command -v systemd-analyze >/dev/null 2>&1; then
    run "systemd-analyze verify deploy/systemd/wxrelay.service" unit_check
else
    skip "systemd-analyze verify deploy/systemd/wxrelay.service" "no systemd-analyze"
fi

# --- result -------------------------------------------------------------------

if [ "$failures" -ne 0 ]; then
    printf '%d check(s) failed\n' "$failures"
    exit 1
fi
echo "all deployment checks passed"
