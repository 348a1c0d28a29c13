#!/usr/bin/env bash
# Install what the Slurm tests need: a real slurmctld, slurmd, munge and the
# client tools (Debian packages), plus the netns tools the test cluster uses.
# Idempotent: does nothing when every command is already there.
set -euo pipefail

# command -> Debian package that ships it
declare -A PKG=(
    [slurmctld]=slurmctld [slurmd]=slurmd [srun]=slurm-client [sbatch]=slurm-client
    [scontrol]=slurm-client [munged]=munge [ip]=iproute2 [nsenter]=util-linux [unshare]=util-linux
)
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin, which a non-root PATH may lack
missing=()
for cmd in "${!PKG[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG[$cmd]}")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup_slurm: slurm, munge and netns tools already installed"
    exit 0
fi
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "setup_slurm: installing ${pkgs[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
start=$SECONDS
$SUDO apt-get update -qq
# Where policy-rc.d forbids it (containers, CI) the postinst scripts start no
# service; elsewhere a system munged may start.  The tests start their own
# daemons on their own sockets and ports either way.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
echo "setup_slurm: installed in $((SECONDS - start)) s"
