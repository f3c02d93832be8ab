// Command kube-apiserver is the upstream apiserver, built from the k8s.io/kubernetes module for the
// project's real-apiserver tests (scripts/ensure-kube-apiserver.sh). Nothing here is shipped.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
