# %systemd_preun nodeward.service: on removal (not upgrade), disable and stop the service.
if [ "$1" -eq 0 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper remove-system-units nodeward.service || :
    elif command -v systemctl >/dev/null 2>&1; then
        systemctl --no-reload disable --now nodeward.service >/dev/null 2>&1 || :
    fi
fi
