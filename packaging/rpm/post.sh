# %post: state directories; enable on first install (%systemd_post), then start it; on an
# upgrade ($1 >= 2) restart the daemon: workers live in their own scopes and are adopted.
systemd-tmpfiles --create hermes-mgr.conf || :
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -eq 1 ]; then
        systemctl preset hermes-dispatcher.service >/dev/null 2>&1 || :
        systemctl enable --now hermes-dispatcher.service >/dev/null 2>&1 || :
    else
        systemctl try-restart hermes-dispatcher.service >/dev/null 2>&1 || :
    fi
fi
