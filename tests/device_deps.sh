# Sourced by the device scripts (tests/cuda/run_on_device.sh, tests/mpi/run_on_device.sh): the
# build dependencies the GPU machine's image lacks (Abseil, sentencepiece, nlohmann_json,
# pkgconf) travel as Debian packages in .debs and are unpacked under /tmp/dev, never into /.
# Sets LD_LIBRARY_PATH and PKG_CONFIG_PATH, and pkgcfg_args for cmake.
DEV=/tmp/dev
if compgen -G ".debs/*.deb" >/dev/null; then
  mkdir -p "$DEV"
  for f in .debs/*.deb; do dpkg -x "$f" "$DEV"; done
fi
export LD_LIBRARY_PATH="$DEV/usr/lib/x86_64-linux-gnu:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PKG_CONFIG_PATH="$DEV/usr/lib/x86_64-linux-gnu/pkgconfig:$DEV/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
pkgcfg_args=()
if ! command -v pkg-config >/dev/null && [ -x "$DEV/usr/bin/pkgconf" ]; then
  pkgcfg_args=(-DPKG_CONFIG_EXECUTABLE="$DEV/usr/bin/pkgconf")
fi
# the .pc files say prefix=/usr; point them at the unpacked copy
for pc in "$DEV"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc; do
  [ -f "$pc" ] && sed -i "s|^prefix=/usr$|prefix=$DEV/usr|" "$pc"
done
