#!/usr/bin/env bash
# Fails when a released file was edited. A database at version A is updated by running
# sql/queue_ext--A--B.sql, and the upgrade test starts from sql/released/queue_ext--A.sql:
# once B is out, editing either changes what a real upgrade does without changing its version.
#
# Frozen files:
#   - sql/released/queue_ext--V.sql (the install script of released version V);
#   - sql/queue_ext--A--B.sql whose target B is released (sql/released/queue_ext--B.sql exists).
#
# Two independent checks:
#   1. the committed manifest sql/released/SHA256SUMS names every frozen file with its hash
#      (always run: it needs no tags, so it works in a clone made with --no-tags or --depth 1);
#   2. where the release tags are present (git tag vV, annotated), each frozen file must equal
#      its content at every tag that contains it: an upgrade script at its target's tag, an
#      install script at the tags after it was frozen. Tags missing from the clone are reported
#      and skipped; the manifest still holds.
#
# Freezing version V: tag vV, add sql/released/queue_ext--V.sql, then
#   (cd sql && sha256sum released/queue_ext--*.sql queue_ext--*--V.sql ...) >> released/SHA256SUMS
# (the manifest lists paths relative to sql/, sorted).
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0
frozen=()
for f in sql/released/queue_ext--*.sql; do
  [ -e "$f" ] || continue
  frozen+=("$f")
done
for f in sql/queue_ext--*--*.sql; do
  [ -e "$f" ] || continue
  target=${f##*--}; target=${target%.sql}
  if [ -e "sql/released/queue_ext--$target.sql" ]; then frozen+=("$f"); fi
done

# 1. The manifest: every frozen file listed and unchanged, nothing listed that is gone.
manifest=sql/released/SHA256SUMS
if [ ! -f "$manifest" ]; then
  echo "check_released: $manifest is missing" >&2
  fail=1
else
  for f in "${frozen[@]}"; do
    if ! grep -q "  ${f#sql/}\$" "$manifest"; then
      echo "check_released: $f is released but not listed in $manifest" >&2
      fail=1
    fi
  done
  if ! (cd sql && sha256sum --quiet --strict -c released/SHA256SUMS) >&2; then
    echo "check_released: a released file differs from $manifest (released files are never edited; write a new upgrade script instead)" >&2
    fail=1
  fi
fi

# 2. The tags, where the clone has them.
tags_used=0
for f in "${frozen[@]}"; do
  case "$f" in
    sql/released/*)
      # Compare with every release tag that already holds the file.
      for tag in $(git tag -l 'v[0-9]*' --sort=version:refname); do
        if git cat-file -e "$tag:$f" 2>/dev/null; then
          tags_used=1
          if ! git show "$tag:$f" | cmp -s - "$f"; then
            echo "check_released: $f differs from its content at tag $tag" >&2
            fail=1
          fi
        fi
      done
      ;;
    *)
      target=${f##*--}; target=${target%.sql}
      tag=v$target
      if ! git rev-parse -q --verify "refs/tags/$tag" >/dev/null; then
        echo "check_released: tag $tag is not in this clone; $f checked against $manifest only"
        continue
      fi
      tags_used=1
      if ! git cat-file -e "$tag:$f" 2>/dev/null; then
        echo "check_released: $f does not exist at tag $tag, yet $target is released" >&2
        fail=1
      elif ! git show "$tag:$f" | cmp -s - "$f"; then
        echo "check_released: $f differs from its content at tag $tag (released upgrade scripts are never edited)" >&2
        fail=1
      fi
      ;;
  esac
done

if [ "$fail" -ne 0 ]; then exit 1; fi
if [ "$tags_used" -eq 1 ]; then how="$manifest and the release tags"; else how="$manifest (no release tags in this clone)"; fi
echo "check_released: ${#frozen[@]} released files unchanged (checked against $how)"
