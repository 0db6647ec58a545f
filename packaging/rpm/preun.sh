# %preun: on erase ($1 = 0) disable and stop the daemon (%systemd_preun); workers keep
# running in their scopes; an upgrade ($1 >= 1) leaves it running.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now hermes-dispatcher.service >/dev/null 2>&1 || :
fi
