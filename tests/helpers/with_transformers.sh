#!/usr/bin/env bash
# Run the tests that exercise transformers' model code (pytest marker `transformers`, slow ones included)
# against another transformers release, without touching the installed one:
#
#   tests/helpers/with_transformers.sh VERSION [PYTEST ARGS...]
#   e.g. tests/helpers/with_transformers.sh 5.17.0 -q -x              (tests/ with pytest.ini's testpaths)
#        tests/helpers/with_transformers.sh 5.17.0 -q tests/unit       (those under a path)
#
# The release is installed once into .cache/transformers-VERSION (pip install --target, no dependencies),
# with those of its dependencies whose installed version it does not admit (5.17 needs huggingface_hub
# 1.x where 5.25 uses 2.x); that folder goes first on PYTHONPATH, which the tests' subprocesses and
# torchrun workers inherit. The supported range is requirements.txt's; its two ends are the ones to run.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 TRANSFORMERS_VERSION [PYTEST ARGS...]" >&2
    exit 2
fi
version=$1
shift
repo=$(cd "$(dirname "$0")/../.." && pwd)
target="$repo/.cache/transformers-$version"

if [ ! -f "$target/.complete" ]; then
    rm -rf "$target"
    python -m pip install --quiet --target "$target" --no-deps "transformers==$version"
    # Requirements of what the folder holds that the folder plus this environment do not meet, added
    # until none is left (a dependency pulled in this way may have requirements of its own).
    for _ in 1 2 3; do
        unmet=$(python - "$target" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, distributions, version

from packaging.requirements import Requirement

target = sys.argv[1]
sys.path.insert(0, target)
for dist in distributions(path=[target]):
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            met = req.specifier.contains(version(req.name), prereleases=True)
        except PackageNotFoundError:
            met = False
        if not met:
            print(f"{req.name}{req.specifier}")
EOF
        )
        [ -z "$unmet" ] && break
        # shellcheck disable=SC2086  # one argument per requirement
        python -m pip install --quiet --target "$target" --no-deps $unmet
    done
    touch "$target/.complete"
fi

cd "$repo"
export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
found=$(python -c "import transformers, huggingface_hub; print(transformers.__version__, huggingface_hub.__version__)")
echo "transformers and huggingface_hub: $found (from $target)"
[ "${found%% *}" = "$version" ] || { echo "error: transformers $version is not the one imported" >&2; exit 2; }
exec python -m pytest -m transformers -p no:cacheprovider "$@"  # paths in the arguments narrow it; none: tests/ (pytest.ini)
