#!/bin/sh
# mosquitto in the foreground; listener 1883 on all addresses; password auth
# from env MQTT_USERNAME / MQTT_PASSWORD (anonymous access refused).
set -eu

[ "${1:-}" = mosquitto ] && [ $# -eq 1 ] || exec "$@"

if [ -z "${MQTT_USERNAME:-}" ] || [ -z "${MQTT_PASSWORD:-}" ]; then
  echo >&2 'error: MQTT_USERNAME and MQTT_PASSWORD must be set'
  exit 1
fi
case "$MQTT_USERNAME" in *:*) echo >&2 'error: MQTT_USERNAME must not contain ":"'; exit 1 ;; esac

if [ "$(id -u)" = 0 ]; then
  dir=/run/mosquitto
  mkdir -p "$dir" /mosquitto/data
  chown mosquitto:mosquitto "$dir"
  [ "$(stat -c %U /mosquitto/data)" = mosquitto ] || chown -R mosquitto:mosquitto /mosquitto/data
else
  dir="${TMPDIR:-/tmp}"
fi

umask 077
# Password fed on stdin (printf is a builtin), never on a command line.
# (Not `mosquitto_passwd -U`: it truncates passwords at a ":".)
rm -f "$dir/passwd"
printf '%s\n%s\n' "$MQTT_PASSWORD" "$MQTT_PASSWORD" \
  | mosquitto_passwd -c "$dir/passwd" "$MQTT_USERNAME" >/dev/null
cat > "$dir/mosquitto.conf" <<CONF
per_listener_settings false
allow_anonymous false
password_file $dir/passwd
listener 1883
persistence true
persistence_location /mosquitto/data/
log_dest stderr
log_timestamp_format %Y-%m-%dT%H:%M:%S
log_type error
log_type warning
log_type notice
log_type information
# Health checks connect every few seconds: keep their connects out of the log.
connection_messages false
CONF
if [ "$(id -u)" = 0 ]; then chown mosquitto:mosquitto "$dir/passwd" "$dir/mosquitto.conf"; fi
unset MQTT_PASSWORD

# Started as root, mosquitto drops to user "mosquitto" itself after binding.
exec mosquitto -c "$dir/mosquitto.conf"
