#!/usr/bin/env bash
# setup_ohif.sh OUTDIR [CACHE_DIR]
#
# Unpack the prebuilt OHIF v3 dist (npm @ohif/app, pinned below) into OUTDIR and patch it so that
# Orthanc's ServeFolders plugin can serve it under /ohif next to Orthanc's DICOMweb plugin
# (recipe and reasons: the viewer study VIEWERS.md, section "Recipe that works"; the reasons are
# repeated at each step below).
#
# The npm tarball is taken from CACHE_DIR (default: <repo>/.cache/ohif); `npm pack` fetches it
# there from the npm registry only when it is missing. OUTDIR is replaced.
#
# The data source is configured relative to the page's origin (window.location.origin), so the
# same dist works for an Orthanc on any port, as long as OHIF is served by that Orthanc.
set -euo pipefail
OHIF_VERSION=3.13.2
TARBALL=ohif-app-${OHIF_VERSION}.tgz
OUT=${1:?usage: setup_ohif.sh OUTDIR [CACHE_DIR]}
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${2:-$HERE/../../.cache/ohif}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
if [ ! -s "$CACHE/$TARBALL" ]; then
  echo "setup_ohif.sh: fetching @ohif/app@$OHIF_VERSION with npm pack into $CACHE" >&2
  (cd "$CACHE" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
fi
[ -s "$CACHE/$TARBALL" ] || { echo "setup_ohif.sh: $CACHE/$TARBALL missing after npm pack" >&2; exit 1; }

mkdir -p "$(dirname "$OUT")"
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
tmp=$(mktemp -d "$OUT.unpack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tar xzf "$CACHE/$TARBALL" -C "$tmp" package/dist
cd "$tmp/package/dist"

# 1. The webpack public path "/" is hard-coded in the app, worker and lazy-chunk bundles.
patched=0
for f in $(grep -l '__webpack_require__.p = "/"' ./*.js); do
  sed -i 's#__webpack_require__.p = "/"#__webpack_require__.p = "/ohif/"#' "$f"
  patched=$((patched + 1))
done
[ "$patched" -gt 0 ] || { echo "setup_ohif.sh: no webpack public path found to patch" >&2; exit 1; }
# 2. Absolute links in index.html, the CSS font URL and manifest.json.
sed -i -e 's#window.PUBLIC_URL="/"#window.PUBLIC_URL="/ohif/"#g' -e 's#\(href\|src\|content\)="/#\1="/ohif/#g' index.html
sed -i 's#url(/#url(/ohif/#g' app.bundle.css
sed -i 's#"/assets#"/ohif/assets#g' manifest.json
# 3. ServeFolders has no SPA fallback: the routes are extension-less copies of index.html
#    (served as text/html through the "" extension of the ServeFolders config).
for r in viewer segmentation basic; do cp index.html "$r"; done
# 4. Our app config: one DICOMweb data source on the serving Orthanc, no tours, no prompts.
cat > app-config.js <<'CFG'
(function () {
  var origin = window.location.origin;
  window.config = {
    name: 'orthanc-servefolders',
    routerBasename: '/ohif',
    extensions: [], modes: [],
    customizationService: [{ 'ohif.tours': { $set: [] } }],
    disableConfirmationPrompts: true,
    showStudyList: true, maxNumberOfWebWorkers: 3, showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true, showLoadingIndicator: true, strictZSpacingForVolumeViewport: true,
    maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 }, showErrorDetails: 'always',
    investigationalUseDialog: { option: 'never' },
    defaultDataSourceName: 'orthanc',
    dataSources: [{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc', name: 'orthanc',
        wadoUriRoot: origin + '/wado',
        qidoRoot: origin + '/dicom-web',
        wadoRoot: origin + '/dicom-web',
        qidoSupportsIncludeField: false, supportsReject: false,
        imageRendering: 'wadors', thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
        staticWado: false, singlepart: 'bulkdata,video', bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    }],
  };
})();
CFG
echo "ohif $OHIF_VERSION patched-bundles=$patched" > .cxrnode-ohif
cd - >/dev/null
rm -rf "$OUT"
mv "$tmp/package/dist" "$OUT"
echo "setup_ohif.sh: OHIF $OHIF_VERSION ready in $OUT ($patched bundles patched)" >&2
