#!/usr/bin/env bash
# Package the filter module as OCI images that Istio's agent pulls (`oci://` in an EnvoyFilter's
# remote code source or a WasmPlugin), without a container engine: `oras` writes an OCI image
# layout directory, which is then also packed as one tar archive.
#
#   deploy/oci/build-image.sh <module.wasm> <output dir> <tag>      (ORAS=path/to/oras)
#
# Two images of the same module, in the two variants of the Wasm image format Istio's puller
# reads (pkg/wasm/imagefetcher.go in Istio):
#   <tag>           "compat" variant: one application/vnd.oci.image.layer.v1.tar+gzip layer holding
#                   plugin.wasm, a plain OCI image config, and the manifest annotation
#                   module.wasm.image/variant=compat. Every Istio release with Wasm support reads
#                   it, and so does every registry and image tool, as it is an ordinary image.
#   <tag>-artifact  "oci" (artifact) variant: the module itself as an
#                   application/vnd.module.wasm.content.layer.v1+wasm layer, whose digest is the
#                   module's sha256, next to the runtime configuration layer
#                   (application/vnd.module.wasm.config.v1+json, also the manifest's config).
#                   Istio reads this variant only with exactly these two layers.
#
# Output: <output dir>/layout (the OCI image layout) and <output dir>/voice-limit-guard-<tag>.oci.tar.
# Timestamps come from SOURCE_DATE_EPOCH (default: the last commit's time), so a rebuild of the
# same commit gives the same manifests and blobs (only the order of index.json's entries may
# vary): a digest pinned in a manifest (url ...@sha256:, sha256:) stays valid.
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 <module.wasm> <output dir> <tag>" >&2
  exit 2
fi
wasm=$1 out=$2 tag=$3
oras=${ORAS:-oras}
name=voice-limit-guard

[ -f "$wasm" ] || { echo "$0: $wasm not found (make build)" >&2; exit 1; }
# A module is only worth packaging if it is one: the Wasm magic number and version 1.
[ "$(head -c 8 "$wasm" | od -An -tx1 | tr -d ' \n')" = "0061736d01000000" ] \
  || { echo "$0: $wasm is not a Wasm module" >&2; exit 1; }
# The proxy-wasm ABI the module exports (proxy_abi_version_0_2_1 -> 0.2.1), for the runtime config.
# (sort reads all of grep's output: no SIGPIPE for pipefail to trip on.)
abi=$(grep -a -o 'proxy_abi_version_[0-9]*_[0-9]*_[0-9]*' "$wasm" | sort -u | sed 's/^proxy_abi_version_//; s/_/./g') || true
case $abi in
  *[!0-9.]* | "") echo "$0: $wasm exports no single proxy_abi_version_* function" >&2; exit 1 ;;
esac

epoch=${SOURCE_DATE_EPOCH:-$(git -C "$(dirname "$0")" log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/compat" "$stage/artifact"

# compat: plugin.wasm at the root of a reproducible tar.gz (fixed owner, mode and time; gzip -n
# leaves the name and time out of the gzip header).
install -m 0644 "$wasm" "$stage/compat/plugin.wasm"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" --format=ustar \
  -C "$stage/compat" -cf "$stage/plugin.tar" plugin.wasm
gzip -n -9 -c "$stage/plugin.tar" > "$stage/compat/plugin.tar.gz"
diff_id=sha256:$(sha256sum "$stage/plugin.tar" | cut -d' ' -f1)
# The image config of an image with that one layer (os/architecture as Go names Wasm/WASI).
printf '{"architecture":"wasm","os":"wasip1","created":"%s","config":{},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
  "$created" "$diff_id" > "$stage/compat/config.json"

# artifact: the module as it is, and the runtime configuration of the Wasm artifact format.
install -m 0644 "$wasm" "$stage/artifact/plugin.wasm"
printf '{"type":"envoy_proxy","abiVersions":["%s"],"config":{"root_ids":["voice_limit_guard"]}}' \
  "$abi" > "$stage/artifact/runtime-config.json"

rm -rf "$out/layout" "$out/$name-$tag.oci.tar"
mkdir -p "$out"
layout=$(cd "$out" && pwd)/layout
# No org.opencontainers.image.title on the manifest: oras reads that annotation as a file name
# and `oras pull` would write the manifest out as a file.
common=(--oci-layout --no-tty
  --annotation "org.opencontainers.image.created=$created"
  --annotation "org.opencontainers.image.description=voice-limit-guard: per-room participant limits for Matrix calls (proxy-wasm filter for Envoy)"
  --annotation "org.opencontainers.image.version=$tag"
  --annotation "org.opencontainers.image.licenses=Apache-2.0")

# oras names each layer after its file (org.opencontainers.image.title), relative to the
# directory it runs in; `oras pull` writes the files under those names.
(cd "$stage/compat" && "$oras" push "${common[@]}" \
  --annotation module.wasm.image/variant=compat \
  --config config.json:application/vnd.oci.image.config.v1+json \
  "$layout:$tag" plugin.tar.gz:application/vnd.oci.image.layer.v1.tar+gzip) >/dev/null
(cd "$stage/artifact" && "$oras" push "${common[@]}" \
  --config runtime-config.json:application/vnd.module.wasm.config.v1+json \
  "$layout:$tag-artifact" \
  runtime-config.json:application/vnd.module.wasm.config.v1+json \
  plugin.wasm:application/vnd.module.wasm.content.layer.v1+wasm) >/dev/null

# oras leaves its (empty) upload area in the layout; it is not part of the layout format.
rmdir "$layout/ingest" 2>/dev/null || true
# The same layout as one file, to carry to a machine that can reach the registry.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
  -C "$layout" -cf "$out/$name-$tag.oci.tar" .

for t in "$tag" "$tag-artifact"; do
  digest=$("$oras" manifest fetch --oci-layout --descriptor "$layout:$t" | sed -n 's/.*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p')
  echo "$name:$t  manifest $digest"
done
echo "module sha256:$(sha256sum "$wasm" | cut -d' ' -f1) ($(stat -c %s "$wasm") bytes)"
echo "layout $layout ($(du -sk "$layout" | cut -f1) KiB), archive $out/$name-$tag.oci.tar ($(stat -c %s "$out/$name-$tag.oci.tar") bytes)"
