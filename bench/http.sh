#!/usr/bin/env bash
# HTTP benchmark of `mediastore serve`, each figure beside its baseline from
# the same run, on loopback:
#   - metadata GET req/s beside nginx serving a small static file of the
#     same size;
#   - download of a 64 MiB file beside nginx serving the same bytes;
#   - upload of 256 MiB beside a raw write + fsync of the same bytes;
#   - peak RSS of the server during a 1 GiB upload.
# Prints one JSON object per line. Installs nginx and wrk from Debian when
# they are missing. Usage: bench/http.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1
secs=10
[ $quick = 1 ] && secs=2

need() {
  command -v "$1" >/dev/null 2>&1 && return
  echo "installing $2 ..." >&2
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq "$2") >/dev/null
  else
    (sudo apt-get update -qq && sudo apt-get install -y -qq "$2") >/dev/null
  fi
}
need nginx nginx
need wrk wrk
need curl curl

cargo build --release --locked --bin mediastore >&2
bin="$PWD/target/release/mediastore"

# On disk (not a tmpfs), like a real data dir.
work="$(mktemp -d "$PWD/.mediastore-http-bench-XXXXXX")"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# --- mediastore
cat >"$work/mediastore.toml" <<EOF
[store]
data_dir = "$work/data"
max_object_size = "2GiB"
EOF
"$bin" serve --config "$work/mediastore.toml" --listen 127.0.0.1:0 >"$work/ms.out" 2>"$work/ms.log" &
ms_pid=$!
pids+=("$ms_pid")
for _ in $(seq 1 200); do grep -q 'listening on' "$work/ms.out" 2>/dev/null && break; sleep 0.05; done
ms="$(grep -o 'http://[0-9.:]*' "$work/ms.out" | head -1)"

# --- nginx, as shipped (sendfile on), one worker per core.
mkdir -p "$work/www" "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
daemon off;
events { worker_connections 1024; }
http {
  access_log $work/nginx/access.log;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  server {
    listen 127.0.0.1:18765;
    root $work/www;
    default_type application/octet-stream;
  }
}
EOF
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" 2>>"$work/nginx/error.log" &
pids+=("$!")
ng="http://127.0.0.1:18765"
for _ in $(seq 1 100); do curl -s -o /dev/null "$ng/" && break; sleep 0.05; done

rate() { # wrk output -> requests per second
  awk '/^Requests\/sec:/ {print $2}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }'; }

# --- metadata GET vs a static file of the same size
head -c $((64 << 20)) /dev/urandom >"$work/big.bin"
id="$(curl -s -X POST --data-binary @"$work/big.bin" -H 'X-Media-Filename: big.bin' \
  "$ms/v1/media?scope=bench" | sed -E 's/.*"uuid":"([^"]+)".*/\1/')"
curl -s "$ms/v1/media/$id" >"$work/www/meta.json"
cp "$work/big.bin" "$work/www/big.bin"
chmod 755 "$work" "$work/www"
chmod 644 "$work/www/"*
meta_bytes=$(stat -c %s "$work/www/meta.json")
# Both sides must serve the same bytes, or the comparison means nothing.
check() { # url expected-bytes
  local got
  got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' "$1")
  [ "$got" = "200 $2" ] || { echo "$1 answered '$got', expected '200 $2'" >&2; exit 1; }
}
check "$ng/meta.json" "$meta_bytes"
check "$ms/v1/media/$id" "$meta_bytes"
check "$ng/big.bin" $((64 << 20))
check "$ms/v1/media/$id/content" $((64 << 20))
# The two sides alternate in rounds, each first in every other round: the
# host's speed drifts by tens of percent within seconds, and both must see
# the same drift. The figure is the mean rate over the rounds.
rounds=6
[ $quick = 1 ] && rounds=2
round_secs=$(( secs * 2 / rounds > 0 ? secs * 2 / rounds : 1 ))
alternate() { # conns url-a url-b -> "mean-rate-a mean-rate-b"
  local a=0 b=0 r ra rb
  for r in $(seq 1 $rounds); do
    if [ $((r % 2)) = 1 ]; then
      ra=$(wrk -t2 -c"$1" -d${round_secs}s "$2" | rate); rb=$(wrk -t2 -c"$1" -d${round_secs}s "$3" | rate)
    else
      rb=$(wrk -t2 -c"$1" -d${round_secs}s "$3" | rate); ra=$(wrk -t2 -c"$1" -d${round_secs}s "$2" | rate)
    fi
    a=$(awk -v x="$a" -v y="$ra" 'BEGIN { print x + y }')
    b=$(awk -v x="$b" -v y="$rb" 'BEGIN { print x + y }')
  done
  awk -v a="$a" -v b="$b" -v n="$rounds" 'BEGIN { printf "%.1f %.1f\n", a / n, b / n }'
}
read -r ms_meta ng_meta < <(alternate 32 "$ms/v1/media/$id" "$ng/meta.json")
echo "{\"bench\":\"http_metadata\",\"response_bytes\":$meta_bytes,\"req_per_s\":$ms_meta,\"nginx_req_per_s\":$ng_meta,\"ratio_to_nginx\":$(ratio "$ms_meta" "$ng_meta")}"

# --- 64 MiB download
read -r ms_dl ng_dl < <(alternate 4 "$ms/v1/media/$id/content" "$ng/big.bin")
mb() { awk -v r="$1" 'BEGIN { printf "%.1f", r * 64 }'; }
echo "{\"bench\":\"http_download\",\"file_bytes\":$((64 << 20)),\"mb_per_s\":$(mb "$ms_dl"),\"nginx_mb_per_s\":$(mb "$ng_dl"),\"ratio_to_nginx\":$(ratio "$ms_dl" "$ng_dl")}"

# --- 256 MiB upload vs raw write + fsync (the source is in the page cache
# for both)
up=$((256 << 20))
[ $quick = 1 ] && up=$((32 << 20))
head -c $up /dev/urandom >"$work/up.bin"
cat "$work/up.bin" >/dev/null
raw_start=$(date +%s.%N)
dd if="$work/up.bin" of="$work/raw.bin" bs=1M conv=fsync status=none
raw_s=$(awk -v a="$raw_start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
ms_start=$(date +%s.%N)
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -T "$work/up.bin" \
  -H 'X-Media-Filename: up.bin' "$ms/v1/media?scope=upload")
ms_s=$(awk -v a="$ms_start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
[ "$code" = 201 ] || { echo "upload failed: $code" >&2; exit 1; }
mbps() { awk -v s="$1" -v n="$up" 'BEGIN { printf "%.1f", n / 1048576 / s }'; }
echo "{\"bench\":\"http_upload\",\"file_bytes\":$up,\"mb_per_s\":$(mbps "$ms_s"),\"raw_mb_per_s\":$(mbps "$raw_s"),\"ratio_to_raw\":$(ratio "$raw_s" "$ms_s")}"

# --- peak RSS during a 1 GiB upload
big=$((1 << 30))
[ $quick = 1 ] && big=$((64 << 20))
head -c $big /dev/urandom >"$work/huge.bin"
rm -f "$work/up.bin" "$work/raw.bin"
before_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$ms_pid/status")
# VmHWM is the peak so far; reset it so the figure is this upload's.
echo 5 >"/proc/$ms_pid/clear_refs" 2>/dev/null || true
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -T "$work/huge.bin" \
  -H 'X-Media-Filename: huge.bin' "$ms/v1/media?scope=huge")
[ "$code" = 201 ] || { echo "1 GiB upload failed: $code" >&2; exit 1; }
peak_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$ms_pid/status")
echo "{\"bench\":\"http_upload_rss\",\"file_bytes\":$big,\"rss_before_mib\":$(awk -v k="$before_kb" 'BEGIN { printf "%.1f", k / 1024 }'),\"peak_rss_mib\":$(awk -v k="$peak_kb" 'BEGIN { printf "%.1f", k / 1024 }'),\"limit_mib\":64}"

# --- peak RSS during a download of the same file
echo 5 >"/proc/$ms_pid/clear_refs" 2>/dev/null || true
huge_id="$(curl -s "$ms/v1/scopes/huge" | sed -E 's/.*"uuid":"([^"]+)".*/\1/')"
code=$(curl -s -o /dev/null -w '%{http_code}' "$ms/v1/media/$huge_id/content")
[ "$code" = 200 ] || { echo "1 GiB download failed: $code" >&2; exit 1; }
peak_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$ms_pid/status")
echo "{\"bench\":\"http_download_rss\",\"file_bytes\":$big,\"peak_rss_mib\":$(awk -v k="$peak_kb" 'BEGIN { printf "%.1f", k / 1024 }'),\"limit_mib\":64}"
