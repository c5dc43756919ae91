#!/usr/bin/env bash
# Local stand-ins for the two base images the Dockerfile names, for machines that reach Debian's
# package mirror and crates.io but no container registry (this project's build machines):
#
#   rust:<RUST_VERSION>-slim-<DEBIAN_RELEASE>   e.g. rust:1.95-slim-trixie   (build stage)
#   debian:<DEBIAN_RELEASE>-slim                e.g. debian:trixie-slim      (runtime stage)
#
# The tags are read from the Dockerfile's ARG defaults, so `docker build -t rdev-api .` then
# finds both locally and pulls nothing.
#
# These are STAND-INS, not copies of the official images: the same release and the same commands
# on PATH, made here from Debian's packages and this machine's Rust toolchain.
#   debian:<release>-slim   `debootstrap --variant=minbase <release>`, imported with the official
#                           image's PATH and CMD, and its apt sources (<release>, -updates,
#                           -security).
#   rust:<v>-slim-<release> that rootfs plus gcc, libc6-dev, ca-certificates and wget (what the
#                           official slim image adds; no make, which the Dockerfile installs itself),
#                           this machine's Rust toolchain under /usr/local/rustup with rustup's
#                           proxies in /usr/local/cargo/bin, the official ENV (RUSTUP_HOME,
#                           CARGO_HOME, PATH, RUST_VERSION), and this machine's local CA
#                           certificates (a TLS proxy's, through which `cargo fetch` reaches
#                           crates.io) added to the CA bundle.
# Both carry the label dev.rdev.stand-in=<tag>, and so does an image built on them.
# Anywhere a registry is reachable, skip this script: `docker build` pulls the real images.
#
#   deploy/image/local-bases.sh              # makes the missing ones; an existing tag is kept
#   deploy/image/local-bases.sh --force      # makes them anew
#   deploy/image/local-bases.sh --postgres   # also postgres:<major> for docker-compose.yml:
#                                            # <release> + Debian's postgresql-<major>, with an
#                                            # entrypoint (postgres-entrypoint.sh beside this)
#                                            # honouring POSTGRES_USER/_PASSWORD/_DB
#
# Needs root, a running Docker daemon, debootstrap (Debian package) and rustup with the
# toolchain of the Dockerfile's RUST_VERSION (e.g. 1.95.0). RUST_TOOLCHAIN_DIR overrides where
# that toolchain is read from; DEBIAN_MIRROR (default http://deb.debian.org/debian) the mirror.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"

force=0
with_postgres=0
for option in "$@"; do
  case "$option" in
    --force) force=1 ;;
    --postgres) with_postgres=1 ;;
    *) echo "usage: $0 [--force] [--postgres]" >&2; exit 2 ;;
  esac
done

fail() { printf 'local-bases: %s\n' "$*" >&2; exit 1; }
log() { printf 'local-bases: %s\n' "$*"; }

arg_default() {
  local value
  value="$(sed -n "s/^ARG $1=//p" "$root/Dockerfile" | head -n 1)"
  [ -n "$value" ] || fail "the Dockerfile has no 'ARG $1=...' default"
  printf '%s\n' "$value"
}
rust_version="$(arg_default RUST_VERSION)"
release="$(arg_default DEBIAN_RELEASE)"
debian_tag="debian:${release}-slim"
rust_tag="rust:${rust_version}-slim-${release}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The official images' PATH.
base_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

command -v docker >/dev/null || fail "docker is not installed"
docker info >/dev/null 2>&1 || fail "no Docker daemon answers (start dockerd first)"

wanted() {
  if [ "$force" -eq 0 ] && docker image inspect "$1" >/dev/null 2>&1; then
    log "$1 exists, kept (--force makes it anew)"
    return 1
  fi
}
# An image this script replaced under its tag: removed when nothing else uses it.
replaced() {
  [ -z "$1" ] || [ "$1" = "$(docker image inspect -f '{{.Id}}' "$2")" ] || docker rmi "$1" >/dev/null 2>&1 || true
}

work="$(mktemp -d /var/tmp/local-bases.XXXXXX)"
helper=""
cleanup() {
  [ -z "$helper" ] || docker rm -f "$helper" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# --- debian:<release>-slim
old_debian="$(docker image inspect -f '{{.Id}}' "$debian_tag" 2>/dev/null || true)"
old_rust="$(docker image inspect -f '{{.Id}}' "$rust_tag" 2>/dev/null || true)"
if wanted "$debian_tag"; then
  [ "$(id -u)" -eq 0 ] || fail "debootstrap needs root"
  command -v debootstrap >/dev/null || fail "debootstrap is not installed (apt-get install debootstrap)"
  rootfs="$work/rootfs"
  log "debootstrap --variant=minbase $release from $mirror (a few minutes)"
  debootstrap --variant=minbase "$release" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
  # The official image's apt sources (deb822), and no package lists or downloaded packages.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $release $release-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $release-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/* "$rootfs"/tmp/*
  : >"$rootfs/etc/hostname"
  : >"$rootfs/etc/resolv.conf"
  tar --numeric-owner -C "$rootfs" -cf - . \
    | docker import \
      --change "ENV PATH=$base_path" \
      --change 'CMD ["bash"]' \
      --change "LABEL dev.rdev.stand-in=$debian_tag" \
      --message "stand-in for $debian_tag: debootstrap --variant=minbase $release (deploy/image/local-bases.sh)" \
      - "$debian_tag" >/dev/null
  rm -rf "$rootfs"
  log "$debian_tag made"
  force=1 # the rust image is made on this one
fi

# --- rust:<version>-slim-<release>
if wanted "$rust_tag"; then
  # This machine's toolchain of that version (rustup resolves its symlinks, e.g. 1.95.0 -> stable).
  toolchain_dir="${RUST_TOOLCHAIN_DIR:-}"
  if [ -z "$toolchain_dir" ]; then
    command -v rustup >/dev/null || fail "rustup is not installed; set RUST_TOOLCHAIN_DIR"
    for name in "$rust_version" "$rust_version.0"; do
      version="$(rustup run "$name" rustc --version 2>/dev/null || true)"
      if [[ "$version" == "rustc $rust_version"* ]]; then
        toolchain_dir="$(rustup run "$name" rustc --print sysroot)"
        break
      fi
    done
    [ -n "$toolchain_dir" ] || fail "no rustup toolchain $rust_version here (rustup toolchain install $rust_version)"
  fi
  toolchain_dir="$(readlink -f "$toolchain_dir")"
  [ -x "$toolchain_dir/bin/cargo" ] && [ -x "$toolchain_dir/bin/rustc" ] \
    || fail "$toolchain_dir has no bin/cargo and bin/rustc"
  full_version="$("$toolchain_dir/bin/rustc" --version | awk '{print $2}')"
  [[ "$full_version" == "$rust_version"* ]] || fail "$toolchain_dir is rustc $full_version, not $rust_version"
  toolchain="$full_version-x86_64-unknown-linux-gnu"
  rustup_bin="$(readlink -f "$(command -v rustup 2>/dev/null || true)" 2>/dev/null || true)"

  # This machine's own CA certificates (those beside Debian's, e.g. a TLS proxy's).
  mkdir -p "$work/ca"
  cp /etc/ssl/certs/ca-certificates.crt "$work/ca/bundle.crt"
  for cert in /usr/local/share/ca-certificates/*.crt; do
    [ -e "$cert" ] && cp "$cert" "$work/ca/local-$(basename "$cert")"
  done

  cat >"$work/install.sh" <<EOF
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends ca-certificates gcc libc6-dev wget >/dev/null
rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/cache/apt/*.bin /var/log/apt/* /var/log/dpkg.log
# Local CAs kept through any later update-ca-certificates; the bundle as this machine has it.
for cert in /mnt/ca/local-*.crt; do
  [ -e "\$cert" ] && cp "\$cert" "/usr/local/share/ca-certificates/\${cert#/mnt/ca/local-}"
done
update-ca-certificates >/dev/null 2>&1
cp /mnt/ca/bundle.crt /etc/ssl/certs/ca-certificates.crt
# The toolchain, without its HTML docs (the official image's minimal profile has none).
mkdir -p /usr/local/rustup/toolchains/$toolchain /usr/local/cargo/bin
tar -C /mnt/toolchain --exclude=./share/doc -cf - . | tar -C /usr/local/rustup/toolchains/$toolchain -xf -
sed -i '/^rust-docs-/d' /usr/local/rustup/toolchains/$toolchain/lib/rustlib/components
rm -f /usr/local/rustup/toolchains/$toolchain/lib/rustlib/manifest-rust-docs-*
printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\nauto_self_update = "disable"\n' \
  "$toolchain" >/usr/local/rustup/settings.toml
if [ -x /mnt/rustup ]; then
  # As the official image: rustup, and its proxies for the toolchain's commands.
  cp /mnt/rustup /usr/local/cargo/bin/rustup
  for tool in /usr/local/rustup/toolchains/$toolchain/bin/*; do
    ln -s rustup "/usr/local/cargo/bin/\$(basename "\$tool")"
  done
else
  for tool in /usr/local/rustup/toolchains/$toolchain/bin/*; do
    ln -s "\$tool" "/usr/local/cargo/bin/\$(basename "\$tool")"
  done
fi
chmod -R a+w /usr/local/rustup /usr/local/cargo
EOF
  mounts=(-v "$work:/mnt/work:ro" -v "$work/ca:/mnt/ca:ro" -v "$toolchain_dir:/mnt/toolchain:ro")
  [ -z "$rustup_bin" ] || mounts+=(-v "$rustup_bin:/mnt/rustup:ro")
  helper="local-bases-$$"
  log "$rust_tag: $debian_tag + gcc, libc6-dev, ca-certificates, wget, Rust $full_version from $toolchain_dir"
  docker run --name "$helper" --network host "${mounts[@]}" "$debian_tag" bash /mnt/work/install.sh \
    || fail "installing into the $rust_tag stand-in failed"
  docker commit \
    --change "ENV RUSTUP_HOME=/usr/local/rustup" \
    --change "ENV CARGO_HOME=/usr/local/cargo" \
    --change "ENV PATH=/usr/local/cargo/bin:$base_path" \
    --change "ENV RUST_VERSION=$full_version" \
    --change 'CMD ["bash"]' \
    --change "LABEL dev.rdev.stand-in=$rust_tag" \
    --message "stand-in for $rust_tag: $debian_tag + gcc, libc6-dev, Rust $full_version (deploy/image/local-bases.sh)" \
    "$helper" "$rust_tag" >/dev/null
  docker rm "$helper" >/dev/null
  helper=""
  log "$rust_tag made"
fi
replaced "$old_rust" "$rust_tag"

# --- postgres:<major> (only with --postgres), the major docker-compose.yml names
if [ "$with_postgres" -eq 1 ]; then
  major="$(sed -n 's/^ *image: postgres:\([0-9][0-9]*\).*/\1/p' "$root/docker-compose.yml" | head -n 1)"
  [ -n "$major" ] || fail "docker-compose.yml names no postgres:<major> image"
  postgres_tag="postgres:$major"
  old_postgres="$(docker image inspect -f '{{.Id}}' "$postgres_tag" 2>/dev/null || true)"
  if wanted "$postgres_tag"; then
    helper="local-bases-$$"
    log "$postgres_tag: $debian_tag + postgresql-$major"
    docker run --name "$helper" --network host \
      -v "$root/deploy/image/postgres-entrypoint.sh:/mnt/entrypoint.sh:ro" "$debian_tag" bash -c "
        set -eu
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
        # As the official image: no cluster at install time; the entrypoint makes one in PGDATA.
        sed -ri 's/#?(create_main_cluster) .*/\\1 = false/' /etc/postgresql-common/createcluster.conf
        apt-get install -y -qq --no-install-recommends postgresql-$major >/dev/null
        rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/cache/apt/*.bin
        install -m 0755 /mnt/entrypoint.sh /usr/local/bin/docker-entrypoint.sh
        mkdir -p /var/lib/postgresql/data /var/run/postgresql
        chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
      " || fail "installing into the $postgres_tag stand-in failed"
    docker commit \
      --change "ENV PATH=/usr/lib/postgresql/$major/bin:$base_path" \
      --change "ENV PGDATA=/var/lib/postgresql/data" \
      --change "ENV PG_MAJOR=$major" \
      --change 'VOLUME /var/lib/postgresql/data' \
      --change 'EXPOSE 5432' \
      --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
      --change 'CMD ["postgres"]' \
      --change "LABEL dev.rdev.stand-in=$postgres_tag" \
      --message "stand-in for $postgres_tag: $debian_tag + postgresql-$major (deploy/image/local-bases.sh)" \
      "$helper" "$postgres_tag" >/dev/null
    docker rm "$helper" >/dev/null
    helper=""
    log "$postgres_tag made"
  fi
  replaced "$old_postgres" "$postgres_tag"
  docker run --rm --network none --entrypoint pg_isready "$postgres_tag" --version \
    || fail "$postgres_tag has no pg_isready"
fi
replaced "$old_debian" "$debian_tag"

# Both answer as the Dockerfile expects.
docker run --rm --network none "$rust_tag" sh -c 'cargo --version && rustc --version && gcc --version | head -n 1' \
  || fail "$rust_tag does not run cargo, rustc and gcc"
docker run --rm --network none "$debian_tag" sh -c '. /etc/os-release && echo "$PRETTY_NAME"' \
  || fail "$debian_tag does not start"
