#!/usr/bin/env bash
# CI setup for the multi-node launcher test (tests/test_launch_runner.py): an sshd on loopback
# that accepts a throwaway key, and ssh aliases worker-1 and worker-2 that point at it, so a
# "two-node" job can run on one machine through the real ssh path.
#
# Idempotent: keys, configs and the daemon are created only when missing or not answering.
# Runs as root (CI does), because sshd needs root to switch to the login user.
set -euo pipefail

dir="${ZEROFX_SSH_DIR:-/tmp/zerofx-ssh}"
port="${ZEROFX_SSH_PORT:-2222}"
hosts="worker-1 worker-2"

say() { echo "10-sshd: $*"; }

if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
    say "installing openssh-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends openssh-server openssh-client >/dev/null
fi
sshd_bin="$(command -v sshd || echo /usr/sbin/sshd)"

mkdir -p "$dir" /run/sshd
chmod 700 "$dir"
# Throwaway keys: a client identity and a host key, never reused outside this directory.
[ -f "$dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C zerofx-ci -f "$dir/id_ed25519"
[ -f "$dir/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C zerofx-ci-host -f "$dir/host_ed25519"
cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
chmod 600 "$dir/authorized_keys"

cat > "$dir/sshd_config" <<CFG
# zerofx CI: loopback-only sshd with its own host key and authorized_keys.
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_ed25519
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
# PAM is not needed for key logins and is often unusable in containers.
UsePAM no
# The key files live in a /tmp directory whose modes sshd's strict checks may reject.
StrictModes no
# The launcher's remote side needs the caller's environment only through explicit exports.
PermitUserEnvironment no
MaxStartups 64:30:128
MaxSessions 64
LogLevel ERROR
CFG

cat > "$dir/ssh_config" <<CFG
# zerofx CI: aliases for the loopback sshd started by .ci/setup.d/10-sshd.sh
Host $hosts
    HostName 127.0.0.1
    Port $port
    User root
    IdentityFile $dir/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
CFG

# ssh reads ~/.ssh/config from the passwd home directory, whatever $HOME says.
home="$(getent passwd "$(id -un)" | cut -d: -f6)"
home="${home:-${HOME:-/root}}"
# The Include must come before any Host block of an existing config, or it would apply only
# inside that block; so prepend it, once.
mkdir -p "$home/.ssh"
chmod 700 "$home/.ssh"
include="Include $dir/ssh_config"
if [ ! -f "$home/.ssh/config" ]; then
    echo "$include" > "$home/.ssh/config"
elif ! grep -qxF "$include" "$home/.ssh/config"; then
    { echo "$include"; cat "$home/.ssh/config"; } > "$home/.ssh/config.zerofx-tmp"
    mv "$home/.ssh/config.zerofx-tmp" "$home/.ssh/config"
fi
chmod 600 "$home/.ssh/config"

reachable() { timeout 20 ssh -o BatchMode=yes -o ConnectTimeout=5 worker-1 true 2>/dev/null; }

if reachable; then
    say "sshd already answering on 127.0.0.1:$port"
    exit 0
fi
# A stale daemon from an earlier run (e.g. started with an older config): stop it first.
# The pid file may be stale and name a reused pid: only signal it if it is an sshd.
pid="$(cat "$dir/sshd.pid" 2>/dev/null || true)"
if [ -n "$pid" ] && [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = sshd ]; then
    kill "$pid" || true
    sleep 0.5
fi
"$sshd_bin" -t -f "$dir/sshd_config"
"$sshd_bin" -f "$dir/sshd_config"
for _ in $(seq 1 50); do
    reachable && { say "sshd started on 127.0.0.1:$port; worker-1 and worker-2 reachable"; exit 0; }
    sleep 0.2
done
say "sshd started but 'ssh worker-1 true' still fails; see $dir/sshd_config" >&2
exit 1
