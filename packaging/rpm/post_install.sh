# %systemd_post nodeward.service: on first install, apply the preset (enable only if the
# distribution's or the admin's preset says so); never start here.
if [ "$1" -eq 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper install-system-units nodeward.service || :
    elif command -v systemctl >/dev/null 2>&1; then
        systemctl --no-reload preset nodeward.service >/dev/null 2>&1 || :
    fi
fi
