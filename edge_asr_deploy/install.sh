#!/bin/sh
# Installs edge-asr ({{TARGET}}, Python {{PYTHON_VERSION}}) from this archive, without network access: a
# virtual environment under PREFIX from the wheels in wheels/, the bundle, the test set and the configuration.
#
#   ./install.sh                      into /opt/edge-asr (root), or --prefix=DIR (any user, e.g. Termux)
#   sudo ./install.sh --service       also the daemon: user edge-asr, /etc/edge-asr/edge-asr.toml, systemd unit
#   sudo ./install.sh --wyoming       also the Wyoming server for Home Assistant (port 10300), systemd unit
#
# Needs python3 {{PYTHON_VERSION}} with venv (Debian / Raspberry Pi OS: apt install python3 python3-venv).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/edge-asr
PYTHON=${PYTHON:-python3}
SERVICE=no
WYOMING=no
for arg in "$@"; do
    case $arg in
        --prefix=*) PREFIX=${arg#--prefix=} ;;
        --service) SERVICE=yes ;;
        --wyoming) WYOMING=yes ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

fail() { echo "install.sh: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found (apt install python3 python3-venv)"
HAVE=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$HAVE" = "{{PYTHON_VERSION}}" ] || fail "this archive's wheels are for Python {{PYTHON_VERSION}}, $PYTHON is $HAVE (build one with --python $HAVE)"
MACHINE=$(uname -m)
case "{{TARGET}}" in
    linux-aarch64) [ "$MACHINE" = aarch64 ] || fail "this archive is for aarch64, this machine is $MACHINE" ;;
    linux-armv7) case $MACHINE in armv7*|armv8l) ;; *) fail "this archive is for armv7, this machine is $MACHINE" ;; esac ;;
    linux-x86_64) [ "$MACHINE" = x86_64 ] || fail "this archive is for x86_64, this machine is $MACHINE" ;;
esac

mkdir -p "$PREFIX" || fail "cannot create $PREFIX (run as root, or pass --prefix=DIR)"
echo "installing edge-asr into $PREFIX"
"$PYTHON" -m venv "$PREFIX/venv" || fail "python3 -m venv failed (apt install python3-venv)"
"$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
    --find-links "$HERE/wheels" -r "$HERE/requirements.txt"
"$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
    "$HERE"/wheels/edge_asr-*.whl
mkdir -p "$PREFIX/bin"
ln -sf "$PREFIX/venv/bin/edge-asr" "$PREFIX/bin/edge-asr"
rm -rf "$PREFIX/bundle" "$PREFIX/testset" "$PREFIX/config"
cp -R "$HERE/bundle" "$HERE/testset" "$HERE/config" "$PREFIX/"
sed "s|@PREFIX@|$PREFIX|g" "$HERE/config/edge-asr.toml" > "$PREFIX/config/edge-asr.toml"
cp "$HERE/ARCHIVE.json" "$PREFIX/"
# Refuses a bundle whose files do not match their sha256.
"$PREFIX/bin/edge-asr" info --bundle "$PREFIX/bundle" >/dev/null

if [ "$SERVICE" = yes ]; then
    [ "$(id -u)" = 0 ] || fail "--service needs root"
    id edge-asr >/dev/null 2>&1 || useradd --system --home /var/lib/edge-asr --groups audio edge-asr
    install -D -m 644 "$PREFIX/config/edge-asr.toml" /etc/edge-asr/edge-asr.toml
    ln -sf "$PREFIX/bin/edge-asr" /usr/local/bin/edge-asr
    install -m 644 "$HERE/systemd/edge-asr.service" /etc/systemd/system/edge-asr.service
    systemctl daemon-reload && systemctl enable --now edge-asr
    echo "daemon running: systemctl status edge-asr; transcripts in /var/lib/edge-asr/transcripts.jsonl"
fi
if [ "$WYOMING" = yes ]; then
    [ "$(id -u)" = 0 ] || fail "--wyoming needs root"
    id edge-asr >/dev/null 2>&1 || useradd --system --home /var/lib/edge-asr --groups audio edge-asr
    ln -sf "$PREFIX/bin/edge-asr" /usr/local/bin/edge-asr
    sed "s|@PREFIX@|$PREFIX|g" "$HERE/systemd/edge-asr-wyoming.service" > /etc/systemd/system/edge-asr-wyoming.service
    systemctl daemon-reload && systemctl enable --now edge-asr-wyoming
    echo "Wyoming server running on port 10300: systemctl status edge-asr-wyoming"
fi
echo "installed; try: $PREFIX/bin/edge-asr transcribe --bundle $PREFIX/bundle $PREFIX/testset/*.wav"
