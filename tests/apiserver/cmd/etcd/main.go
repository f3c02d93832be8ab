// Command etcd is the etcd server at the release k8s.io/kubernetes requires, built for the
// project's real-apiserver tests (scripts/ensure-kube-apiserver.sh). Nothing here is shipped.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
