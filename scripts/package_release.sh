#!/usr/bin/env bash
# Builds the package of a released queue_ext version from its release commit, with that
# commit's own scripts/package.sh: the package an operator already has installed, for tests
# that upgrade from it (tests/test_package_upgrade.py).
#
#   scripts/package_release.sh VERSION [PG]     (PG: 15, the default, for the .deb; 18)
#
# The release commit is the tag vVERSION where the clone has it, otherwise its line in
# sql/released/RELEASES ("VERSION <commit>"): a clone without tags still holds every commit
# of main's history, but a shallow one does not, and then this fails saying so. The tree is
# extracted with git archive into a temporary directory (no worktree, nothing in this clone
# changes); its build goes to target/release-VERSION, which persists, so a second run only
# re-links. The package is copied into this tree's dist/ and its path printed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
version=${1:?usage: scripts/package_release.sh VERSION [PG]}
pg=${2:-15}
case "$version" in
  [0-9]*.[0-9]*.[0-9]*) ;;
  *) echo "package_release: '$version' is not a version (e.g. 0.5.0)" >&2; exit 2 ;;
esac

from_tag=$(git rev-parse -q --verify "refs/tags/v$version^{commit}" || true)
from_map=$(awk -v v="$version" '$1 == v { print $2 }' sql/released/RELEASES 2>/dev/null || true)
if [ -n "$from_tag" ] && [ -n "$from_map" ] && [ "$from_tag" != "$from_map" ]; then
  echo "package_release: tag v$version is $from_tag but sql/released/RELEASES says $from_map" >&2
  exit 1
fi
commit=${from_tag:-$from_map}
if [ -z "$commit" ]; then
  echo "package_release: no tag v$version in this clone and no line for $version in sql/released/RELEASES" >&2
  exit 1
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
  if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
    why="this is a shallow clone; 'git fetch --unshallow' brings the history"
  else
    why="fetch the history that holds it"
  fi
  echo "package_release: the release commit of $version, $commit, is not in this clone ($why)" >&2
  exit 1
fi
if ! git cat-file -e "$commit:scripts/package.sh" 2>/dev/null; then
  echo "package_release: $version ($commit) has no scripts/package.sh to build a package with" >&2
  exit 1
fi

tree=$(mktemp -d /tmp/queue_ext_release.XXXXXX)
trap 'rm -rf "$tree"' EXIT
git archive --format=tar "$commit" | tar -x -C "$tree"
export CARGO_TARGET_DIR=$root/target/release-$version
built=$(cd "$tree" && bash scripts/package.sh "$pg" | tail -1)
[ -f "$built" ] || { echo "package_release: $version's scripts/package.sh printed no package ($built)" >&2; exit 1; }
mkdir -p dist
cp "$built" "dist/$(basename "$built")"
echo "$root/dist/$(basename "$built")"
