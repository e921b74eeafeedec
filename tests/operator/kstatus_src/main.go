// kstatus: read one Kubernetes object as JSON on stdin, print what
// sigs.k8s.io/cli-utils/pkg/kstatus computes for it: "<Status> <message>".
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var object map[string]interface{}
	if err := json.Unmarshal(data, &object); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	result, err := status.Compute(&unstructured.Unstructured{Object: object})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("%s %s\n", result.Status, result.Message)
}
