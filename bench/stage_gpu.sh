#!/usr/bin/env bash
# Stage what bench/gpu_suite.py needs on a device machine into .gpu/ (ignored through
# .git/info/exclude), then print the sizes that travel against the device tool's 64 MiB limit.
#   usage (project root):  bench/stage_gpu.sh [SHARED]        SHARED defaults to ../shared
# Call 1 carries .gpu/davis-real (the real val split, ~26 MB) for the propagation, step and
# evaluation parts. Call 2 carries .whl (Ray + Optuna bundle of SHARED/tools/gpu-wheels.sh, which
# this script does not download) and .gpu/ytvos-real, a subset of ytvos-real's videos sized to
# fit beside the wheels.
set -euo pipefail
shared=${1:-../shared}
limit=$((64 * 1024 * 1024))
mkdir -p .git/info && touch .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
davis_src="$shared/data/davis-real"; davis=.gpu/davis-real
[ -f "$davis_src/ImageSets/2017/val.txt" ] || { echo "$davis_src: no ImageSets/2017/val.txt; expected the davis-real root"; exit 1; }
rm -rf "$davis"; mkdir -p "$davis/ImageSets/2017"
cp "$davis_src/ImageSets/2017/val.txt" "$davis/ImageSets/2017/"
while read -r seq; do
  [ -n "$seq" ] || continue
  for kind in JPEGImages Annotations; do
    mkdir -p "$davis/$kind/480p"; cp -r "$davis_src/$kind/480p/$seq" "$davis/$kind/480p/"
  done
done < "$davis_src/ImageSets/2017/val.txt"
# What travels besides carried folders: tracked files and untracked files git does not ignore.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
davis_bytes=$(du -sb "$davis" | cut -f1)
wheel_bytes=$( [ -d .whl ] && du -sb .whl | cut -f1 || echo 0)
# ytvos subset: smallest videos first until call 2 (tree + wheels + videos) keeps 4 MiB of headroom.
yt_src="$shared/data/ytvos-real/train_all_frames"; yt=.gpu/ytvos-real/train_all_frames
rm -rf .gpu/ytvos-real; mkdir -p "$yt/JPEGImages"
budget=$((limit - tree - wheel_bytes - 4 * 1024 * 1024)); used=0; videos=0
if [ -d "$yt_src/JPEGImages" ]; then
  while read -r size path; do
    [ $((used + size)) -le "$budget" ] || break
    cp -r "$path" "$yt/JPEGImages/"; used=$((used + size)); videos=$((videos + 1))
  done < <(du -sb "$yt_src"/JPEGImages/* | sort -n)
  [ -f "$yt_src/meta.json" ] && cp "$yt_src/meta.json" "$yt/"
fi
yt_bytes=$(du -sb .gpu/ytvos-real | cut -f1)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "working tree $(mib "$tree"); .gpu/davis-real $(mib "$davis_bytes"); .whl $(mib "$wheel_bytes"); .gpu/ytvos-real $(mib "$yt_bytes") ($videos videos)"
echo "call 1 (carry .gpu/davis-real): $(mib $((tree + davis_bytes))) of 64 MiB"
echo "call 2 (carry .whl .gpu/ytvos-real): $(mib $((tree + wheel_bytes + yt_bytes))) of 64 MiB"
[ $((tree + davis_bytes)) -le "$limit" ] || { echo "call 1 is over the 64 MiB limit"; exit 1; }
[ "$wheel_bytes" -gt 0 ] || echo "no .whl/: run $shared/tools/gpu-wheels.sh for call 2 (the Ray training part)"
